"""Which queued requests the next pass through the blocks runs: a pure policy over a snapshot of the queue.

`plan_pass(queue, limits)` looks at plain data (`Queued`: kind, client, session, tokens left, passes waited, ...)
and returns `Pick`s (which requests, and how many of their tokens), touching no socket or tensor, so it is tested
with tables of cases (tests/test_scheduler.py). The rules, in order:

1. **No starvation.** A request that has waited `starve_after` passes or more goes first, whatever its kind.
2. **Inference steps first**, then forwards, then backwards: the head of the queue in that order decides the pass.
   A request that cannot share a pass (a forward that keeps its graph for a backward, a backward) runs alone.
3. **Shared passes** take requests that can share one (sessions' steps and plain forwards over the same blocks),
   at most one step per session (its steps run in order), up to `max_tokens` new tokens and `max_requests`.
4. **Fairness between clients.** The token budget is first shared equally between the clients that wait (one
   request each, round robin), then what is left goes to requests in queue order. A client with one huge request
   (a batch of 64, or a long prompt) cannot take every pass: the others' decoding steps get their share of each.
5. **Gathering.** A pass of 2 or 3 decoding steps costs nearly as much as 8 on a CPU, and with servers in a chain the
   sessions' steps arrive spread over time. So when fewer steps wait than half of the sessions that stepped in the
   last second, the engine waits a little for more (`gather_wait`: a share of the last pass's time, bounded, and only
   while steps keep arriving), never when one session steps alone.
6. **Chunks.** A request larger than its share runs in pieces over several passes: a step by columns (all its rows,
   some of its new tokens: chunked prefill), a forward by rows. A piece is never smaller than one `unit` (a step's
   column is `rows` tokens, a forward's row is `length` tokens); the first request of a pass always gets at least
   one unit, so everything progresses even when one unit is larger than `max_tokens`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

KINDS = ("step", "forward", "backward")  # in priority order


@dataclass(frozen=True)
class Queued:
    """What the policy knows of one queued request."""

    id: int  # arrival order: lower came first
    kind: str  # step | forward | backward
    client: Hashable  # who sent it, its Request.peer (fairness is between peers)
    tokens: int  # new tokens it still has to run
    unit: int = 1  # the smallest piece it can run in (tokens): a step's rows, a forward's sequence length
    session: str | None = None  # a session's steps run one per pass, in order
    waited: int = 0  # passes it has waited in the queue without running
    shared: bool = True  # whether it can share a pass with others
    key: Hashable = None  # requests of one pass must have the same key (the blocks they run)


@dataclass(frozen=True)
class PassLimits:
    max_tokens: int = 512  # new tokens in one pass (a longer prompt is chunked)
    max_requests: int = 64  # requests in one pass
    starve_after: int = 8  # passes a request may wait before it goes first
    gather: float = 0.5  # share of the last pass's time the engine may wait for more steps to join a pass
    max_gather: float = 0.05  # seconds: the longest such wait
    mix_tasks: bool = True  # requests of different adapters share a pass (False: one adapter per pass, a baseline)


@dataclass(frozen=True)
class Pick:
    id: int
    tokens: int  # tokens of the request this pass runs (a whole number of units)


def _order(item: Queued, limits: PassLimits) -> tuple[int, int, int]:
    return (0 if item.waited >= limits.starve_after else 1, KINDS.index(item.kind), item.id)


def plan_pass(queue: Sequence[Queued], limits: PassLimits) -> list[Pick]:
    """The requests of the next pass (empty when the queue is)."""
    if not queue:
        return []
    ordered = sorted(queue, key=lambda item: _order(item, limits))
    head = ordered[0]
    if not head.shared:
        return [Pick(head.id, head.tokens)]
    candidates, sessions = [], set()
    for item in ordered:
        if not item.shared or item.key != head.key or item.kind == "backward":
            continue
        if item.session is not None:
            if item.session in sessions:
                continue  # a later step of a session already in this pass
            sessions.add(item.session)
        candidates.append(item)
    # round robin between clients: each client's first request, then each one's second, ... (head first)
    rank: dict[int, int] = {}
    seen: dict[Hashable, int] = {}
    for item in candidates:
        rank[item.id] = seen.get(item.client, 0)
        seen[item.client] = rank[item.id] + 1
    candidates.sort(key=lambda item: (item.id != head.id, rank[item.id], _order(item, limits)))
    candidates = candidates[:limits.max_requests]
    share = max(1, limits.max_tokens // len(seen))
    given: dict[int, int] = {}
    left = limits.max_tokens
    for fair in (True, False):
        for item in candidates:
            want = item.tokens - given.get(item.id, 0)
            allowance = min(want, left, share if fair else left)
            take = allowance // item.unit * item.unit
            if take == 0 and not given and item.id == head.id:
                take = min(item.unit, item.tokens)  # the head always progresses
            if take > 0:
                given[item.id] = given.get(item.id, 0) + take
                left -= take
    return [Pick(item.id, given[item.id]) for item in candidates if given.get(item.id)]


def gather_wait(queued_sessions: int, recent_sessions: int, pass_seconds: float, limits: PassLimits) -> float:
    """Seconds to wait for more steps before the next pass: while fewer sessions have a step queued than half of
    those that stepped recently, up to `gather` of the last pass's time (at most `max_gather`); else 0."""
    if queued_sessions == 0 or queued_sessions * 2 >= recent_sessions or limits.max_requests <= 1:
        return 0.0
    return min(limits.max_gather, limits.gather * pass_seconds)


__all__ = ["KINDS", "PassLimits", "Pick", "Queued", "gather_wait", "plan_pass"]
