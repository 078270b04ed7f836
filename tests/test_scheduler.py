"""The pass scheduler: a pure policy, checked with tables of queue snapshots and the pass each one gives."""

from __future__ import annotations

import pytest

from swarm.core.server.scheduler import PassLimits, Pick, Queued, gather_wait, plan_pass

L = PassLimits(max_tokens=16, max_requests=4, starve_after=3)


def step(id, client="a", tokens=1, rows=1, session=None, waited=0, key=None):
    return Queued(id, "step", client, tokens, rows, session or f"s{id}", waited, True, key)


def forward(id, client="a", rows=1, length=4, waited=0, keep=False, key=None):
    return Queued(id, "forward", client, rows * length, length, None, waited, not keep, key)


def backward(id, client="a", tokens=8, waited=0):
    return Queued(id, "backward", client, tokens, tokens, None, waited, False)


CASES = {
    "empty": ([], []),
    "one decode": ([step(1)], [Pick(1, 1)]),
    "decodes of four clients share a pass": (
        [step(1, "a"), step(2, "b"), step(3, "c"), step(4, "d")], [Pick(1, 1), Pick(2, 1), Pick(3, 1), Pick(4, 1)]),
    "at most max_requests per pass": (
        [step(i, str(i)) for i in range(1, 7)], [Pick(i, 1) for i in range(1, 5)]),
    "steps before forwards before backwards": (
        [backward(1), forward(2, "b"), step(3, "c")], [Pick(3, 1), Pick(2, 4)]),
    "a backward runs alone, after steps and forwards": ([backward(1), backward(2, "b")], [Pick(1, 8)]),
    "a forward keeping its graph runs alone": ([forward(1, keep=True), forward(2, "b")], [Pick(1, 4)]),
    "plain forwards share a pass behind it": ([forward(1, "b"), forward(2, keep=True), forward(3)], [Pick(1, 4),
                                                                                                    Pick(3, 4)]),
    "a keeping forward alone in the queue runs": ([forward(1, keep=True, rows=2)], [Pick(1, 8)]),
    "one step per session per pass, in order": (
        [step(1, session="s"), step(2, session="s"), step(3, "b")], [Pick(1, 1), Pick(3, 1)]),
    "a long prefill is chunked, decodes of others still run (fair share)": (
        [step(1, "a", tokens=100), step(2, "b"), step(3, "c")], [Pick(1, 14), Pick(2, 1), Pick(3, 1)]),
    "fair share first: a prefill behind decodes gets what is left": (
        [step(1, "b"), step(2, "a", tokens=100)], [Pick(1, 1), Pick(2, 15)]),
    "a batch of 8 rows is chunked by whole columns": (
        [step(1, "a", tokens=8 * 5, rows=8)], [Pick(1, 16)]),
    "a column wider than the budget still runs, alone": ([step(1, tokens=64 * 2, rows=64)], [Pick(1, 64)]),
    "a forward is chunked by whole rows": ([forward(1, rows=10, length=6)], [Pick(1, 12)]),
    "a row longer than the budget waits behind steps": ([forward(1, length=40), step(2, "b")], [Pick(2, 1)]),
    "a row longer than the budget runs alone at the head": ([forward(1, length=40), forward(2, "b")], [Pick(1, 40)]),
    "one client with many requests cannot take the whole pass": (
        [step(1, "a", tokens=16), step(2, "a", tokens=16, session="t"), step(3, "b", tokens=1)],
        [Pick(1, 8), Pick(3, 1), Pick(2, 7)]),
    "a starving backward goes first": ([step(1, "b"), backward(2, waited=3)], [Pick(2, 8)]),
    "a starving forward heads the pass": (
        [step(1, "b"), forward(2, waited=5)], [Pick(2, 4), Pick(1, 1)]),
    "requests over other blocks wait for their own pass": (
        [step(1, key=(0, 4)), step(2, "b", key=(0, 2))], [Pick(1, 1)]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_plan_pass(name):
    queue, expected = CASES[name]
    assert plan_pass(queue, L) == expected


def test_a_waiting_request_is_never_starved():
    """Simulate passes: a client streaming big requests cannot keep another's request out for more than
    starve_after passes."""
    limits = PassLimits(max_tokens=8, max_requests=1, starve_after=4)
    queue = [forward(100, "victim", rows=1, length=8)]
    next_id, passes = 1, 0
    while passes < 50:
        passes += 1
        queue.append(step(next_id, "greedy", tokens=8, session=f"g{next_id}"))
        next_id += 1
        picks = plan_pass(queue, limits)
        picked = {p.id for p in picks}
        if 100 in picked:
            break
        queue = [q if q.id in picked else Queued(q.id, q.kind, q.client, q.tokens, q.unit, q.session, q.waited + 1,
                                                  q.shared, q.key) for q in queue if q.id not in picked]
    assert passes <= limits.starve_after + 1


GATHER = PassLimits(gather=0.5, max_gather=0.05)


@pytest.mark.parametrize("queued, recent, pass_seconds, expected", [
    (1, 1, 0.05, 0.0),  # one session alone never waits
    (1, 2, 0.05, 0.0),  # half of the recent sessions are here
    (1, 3, 0.04, 0.02),  # a third: wait half a pass for the others
    (3, 8, 0.04, 0.02),
    (4, 8, 0.04, 0.0),
    (1, 8, 1.00, 0.05),  # bounded
    (0, 8, 0.04, 0.0),  # nothing to run yet: the engine sleeps on its queue anyway
])
def test_gather_wait(queued, recent, pass_seconds, expected):
    assert gather_wait(queued, recent, pass_seconds, GATHER) == pytest.approx(expected)


def test_no_gathering_without_batching():
    assert gather_wait(1, 8, 0.04, PassLimits(max_requests=1)) == 0.0
