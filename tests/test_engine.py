"""The compute engine in process: work items queued together share passes, each gets exactly its answer alone, and
one item's failure stays its own. (Over real sockets: test_batching.py.)"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import make_tiny_model

from swarm.core.server.backend import BlockSpan
from swarm.core.server.cache import CacheBudget
from swarm.core.server.engine import Engine, ForwardJob, QueueLimits, Refused, StepJob
from swarm.core.server.handler import Session
from swarm.core.server.scheduler import PassLimits
from swarm.core.weights import ModelSource

ATOL = 1e-5
HIDDEN = 64


class Answer:
    """Stands in for a transport Request: keeps the answer and says when it came."""

    def __init__(self, client: str = "a"):
        self.client = client
        self.done = threading.Event()
        self.out: torch.Tensor | None = None
        self.error: tuple[str, str] | None = None

    def reply(self, fields=None, tensors=()):
        self.out = tensors[0] if tensors else None
        self.done.set()

    def fail(self, code, message):
        self.error = (code, message)
        self.done.set()

    def result(self) -> torch.Tensor:
        assert self.done.wait(30), "no answer"
        assert self.error is None, self.error
        return self.out


@pytest.fixture(scope="module")
def span(tmp_path_factory) -> BlockSpan:
    path = make_tiny_model(tmp_path_factory.mktemp("engine") / "m", family="mistral", layers=3, sliding_window=6)
    return BlockSpan.load(ModelSource(str(path)), 0, 3, torch.float32)


def hidden(rows: int, new: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, new, HIDDEN, generator=torch.Generator().manual_seed(seed))


def session(span: BlockSpan, batch: int = 1, max_length: int = 64) -> Session:
    return Session(batch, max_length, (span.start, span.end), batch * max_length)


def step(sess: Session, h: torch.Tensor, client: str = "a", mask=None, start=None, prompts=None) -> StepJob:
    answer = Answer(client)
    return StepJob(answer, client, h, mask, prompts, sess.blocks, session=sess, session_id=str(id(sess)),
                   start=start, finish=lambda job, out: job.request.reply({}, [out]))


def forward(h: torch.Tensor, client: str = "a", mask=None) -> ForwardJob:
    return ForwardJob(Answer(client), client, h, mask, None, None or (0, 3),
                      finish=lambda job, out: job.request.reply({}, [out]))


def alone(span: BlockSpan, steps: list[tuple[torch.Tensor, torch.Tensor | None]], batch: int = 1) -> list:
    cache = span.new_cache(batch, 64)
    return [span.step(h, cache, m) for h, m in steps]


def run(engine: Engine, jobs: list) -> list[torch.Tensor]:
    for job in jobs:
        engine.submit(job)
    if not engine._thread.is_alive():
        engine.start()
    return [job.request.result() for job in jobs]


def test_steps_of_many_sessions_and_a_forward_share_one_pass(span):
    engine = Engine(span, PassLimits(max_tokens=256))
    try:
        a, b, c = session(span), session(span), session(span, batch=2)
        run(engine, [step(a, hidden(1, 5, 1))])  # a holds 5 tokens already
        passes = engine.passes
        mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
        jobs = [step(a, hidden(1, 1, 2), "a"), step(b, hidden(1, 12, 3), "b"), step(c, hidden(2, 4, 4), "c", mask),
                forward(hidden(3, 7, 5), "d")]
        outs = run(engine, jobs)
        assert engine.passes == passes + 1  # all four in one pass
        torch.testing.assert_close(outs[0], alone(span, [(hidden(1, 5, 1), None), (hidden(1, 1, 2), None)])[1],
                                   atol=ATOL, rtol=0)
        torch.testing.assert_close(outs[1], alone(span, [(hidden(1, 12, 3), None)])[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(outs[2], alone(span, [(hidden(2, 4, 4), mask)], batch=2)[0], atol=ATOL, rtol=0)
        with torch.inference_mode():
            torch.testing.assert_close(outs[3], span(hidden(3, 7, 5)), atol=ATOL, rtol=0)
    finally:
        engine.stop()


def test_a_long_prefill_is_chunked_and_decodes_ride_along(span):
    engine = Engine(span, PassLimits(max_tokens=8))
    try:
        a, b = session(span), session(span)
        run(engine, [step(a, hidden(1, 3, 1))])
        passes = engine.passes
        long, decode = step(b, hidden(1, 30, 2), "b"), step(a, hidden(1, 1, 3), "a")
        answered_in: list[int] = []
        decode.finish = lambda job, out: (answered_in.append(engine.passes), job.request.reply({}, [out]))
        outs = run(engine, [long, decode])
        assert engine.passes - passes == 4  # 30 tokens: 7 beside the decode, then 8, 8 and 7
        assert answered_in == [passes + 1]  # the decode did not wait for the prefill
        torch.testing.assert_close(outs[0], alone(span, [(hidden(1, 30, 2), None)])[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(outs[1], alone(span, [(hidden(1, 3, 1), None), (hidden(1, 1, 3), None)])[1],
                                   atol=ATOL, rtol=0)
        assert b.cache.length == 30 and a.cache.length == 4
    finally:
        engine.stop()


def test_rewinds_inside_a_batch(span):
    engine = Engine(span, PassLimits(max_tokens=64))
    try:
        a, b = session(span), session(span)
        run(engine, [step(a, hidden(1, 6, 1)), step(b, hidden(1, 6, 2), "b")])
        # a goes back to 4 and regenerates, b goes on: in one pass
        outs = run(engine, [step(a, hidden(1, 2, 3), start=4), step(b, hidden(1, 1, 4), "b")])
        expected_a = alone(span, [(hidden(1, 6, 1)[:, :4], None), (hidden(1, 2, 3), None)])[1]
        torch.testing.assert_close(outs[0], expected_a, atol=ATOL, rtol=0)
        expected_b = alone(span, [(hidden(1, 6, 2), None), (hidden(1, 1, 4), None)])[1]
        torch.testing.assert_close(outs[1], expected_b, atol=ATOL, rtol=0)
        assert a.cache.length == 6 and b.cache.length == 7
    finally:
        engine.stop()


def test_a_closed_session_and_a_failing_request_fail_alone(span):
    engine = Engine(span, PassLimits(max_tokens=64))
    try:
        a, b, c = session(span), session(span), session(span)
        a.cache = span.new_cache(1, 64)
        span.step(hidden(1, 2, 1), a.cache)
        closed = step(b, hidden(1, 3, 2), "b")
        b.closed = True
        broken = step(c, torch.randn(1, 2, HIDDEN + 1), "c")  # the wrong hidden size: the packed pass fails
        good = step(a, hidden(1, 1, 3))
        for job in (closed, broken, good):
            engine.submit(job)
        engine.start()
        for job in (closed, broken, good):
            assert job.request.done.wait(30)
        assert closed.request.error[0] == "unknown_session"
        assert broken.request.error[0] == "internal"
        expected = alone(span, [(hidden(1, 2, 1), None), (hidden(1, 1, 3), None)])[1]
        torch.testing.assert_close(good.request.out, expected, atol=ATOL, rtol=0)
        assert c.cache.length == 0 and a.cache.length == 3  # the failed step left nothing behind
    finally:
        engine.stop()


def test_a_long_forward_runs_in_chunks_through_a_borrowed_cache(span):
    budget = CacheBudget(1000)
    engine = Engine(span, PassLimits(max_tokens=16), budget=budget)
    try:
        a = session(span)
        run(engine, [step(a, hidden(1, 3, 1))])
        passes = engine.passes
        long, decode = forward(hidden(2, 40, 2), "b"), step(a, hidden(1, 1, 3), "a")
        engine.submit(long)
        assert budget.free == 1000 - 80  # borrowed while it runs
        outs = run(engine, [decode]) + [long.request.result()]
        assert engine.passes - passes >= 40 * 2 // 16
        with torch.inference_mode():
            torch.testing.assert_close(outs[1], span(hidden(2, 40, 2)), atol=ATOL, rtol=0)
        assert budget.free == 1000
    finally:
        engine.stop()


def test_the_queue_is_bounded_in_items_and_bytes_and_per_client(span):
    engine = Engine(span, queue=QueueLimits(max_items=4, max_bytes=1 << 20, client_share=0.5))  # not started
    a = session(span)
    engine.submit(step(a, hidden(1, 1, 0), "x"))
    engine.submit(step(a, hidden(1, 1, 0), "x"))
    with pytest.raises(Refused) as info:
        engine.submit(step(a, hidden(1, 1, 0), "x"))  # x holds half the queue
    assert info.value.code == "busy"
    engine.submit(step(a, hidden(1, 1, 0), "y"))
    with pytest.raises(Refused):
        engine.submit(forward(torch.zeros(1, 4096, HIDDEN), "z"))  # 1 MiB: past the bytes bound
    engine.submit(step(a, hidden(1, 1, 0), "z"))
    with pytest.raises(Refused):
        engine.submit(step(a, hidden(1, 1, 0), "w"))  # 4 items
    engine.stop(timeout=0)
