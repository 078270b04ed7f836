"""The compute engine: one thread that runs queued work items in passes through the blocks, several at a time.

The server's I/O thread turns each compute request into a typed, validated work item (`StepJob`, `ForwardJob`,
`BackwardJob`) and `submit`s it; the queue is bounded in items and bytes, and so is each peer's part of it (a job's
`client` is its `Request.peer`: a remote address or key, or one loopback connection); a request past a bound is
refused `busy` at once instead of growing memory, and the scheduler's fairness is between peers. The engine thread
loops: it takes a snapshot of the queue, asks the scheduler (`scheduler.plan_pass`, a pure policy) which items the
next pass runs and how many of their tokens, and runs them:

- sessions' steps and plain forwards share one pass (`BlockSpan.run`): their new tokens are packed together for the
  linear layers, attention runs per request over its own cache. A long step runs in column chunks over several
  passes (chunked prefill), a big forward in row chunks, interleaved with everyone else's decoding; a forward whose
  sequences are longer than a pass holds borrows cache tokens from the budget for a temporary cache and runs in
  column chunks too (when the budget has no room, it runs by whole rows, bounded by the handler's limits);
- a forward that keeps its graph for a backward, and a backward, run alone (their autograd graphs are per request).

Each item answers its own request. A pass that fails is run again item by item (each step's cache rewound first), so
a bad request gets its own error and the others still get their answers. The engine never dies of an item.
With `PassLimits(max_requests=1, max_tokens=huge)` it runs one request at a time, whole (batching off).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from ...transport.errors import RemoteError, SwarmError
from ...transport.messages import LoraWeights
from ...transport.rpc import Request
from ..adapters import Task
from .backend import BlockSpan, Work
from .cache import CacheBudget
from .scheduler import PassLimits, Pick, Queued, gather_wait, plan_pass

log = logging.getLogger(__name__)


class Refused(RemoteError):
    """Raised inside the server (handler and engine) to answer a request with an error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message, code=code)
        self.code = code

    def __str__(self) -> str:
        return self.remote_message


@dataclass(frozen=True)
class QueueLimits:
    max_items: int = 1024  # requests waiting at once
    max_bytes: int = 256 << 20  # bytes of their tensors
    client_share: float = 0.5  # what one peer (Request.peer) may hold of either bound, so that others find room


@dataclass(eq=False)
class Job:
    """A validated compute request waiting for the engine."""

    request: Request
    client: Hashable  # who sent it (Request.peer): the queue's share and the scheduler's fairness are per peer
    hidden: torch.Tensor
    mask: torch.Tensor | None
    prompts: torch.Tensor | None
    blocks: tuple[int, int]
    tasks: tuple[Task, ...] = ()  # the adapters it runs with in a shared pass (a named one, the client's LoRA)
    lora: LoraWeights | None = None  # the client's LoRA, for a pass that records a graph (its gradients)
    adapter: str | None = None  # the named adapter's name (requests of different ones share passes unless not mixed)
    mix: bool = True  # whether it may share a pass with requests of other adapters (the engine's `mix_tasks`)
    on_done: Callable[[], None] | None = None  # called once when it leaves the queue (answered, failed or dropped)
    id: int = 0
    waited: int = 0  # passes it waited without running
    done: int = 0  # columns (step) or rows (forward) already run
    outputs: list[torch.Tensor] = field(default_factory=list)
    nbytes: int = 0
    cache: Any = None  # the cache it writes while it runs (a session's, or a long forward's temporary one)
    _cache_start: int = 0  # the cache's length when its current pass began
    _position: int = 0  # where it began in the cache (a step that fails is undone back to it)

    def __post_init__(self) -> None:
        self.nbytes = sum(t.nbytes for t in (self.hidden, self.mask, self.prompts) if t is not None)
        self.nbytes += 0 if self.lora is None else self.lora.nbytes

    @property
    def key(self) -> Any:
        """Requests of one pass share this: their blocks (and their adapter, when adapters are not mixed)."""
        return self.blocks if self.mix else (self.blocks, self.adapter, self.lora is not None)


@dataclass(eq=False)
class StepJob(Job):
    session: Any = None  # the handler's Session
    session_id: str = ""
    start: int | None = None
    finish: Callable[[StepJob, torch.Tensor], None] | None = None  # answers (and relays) once every column ran

    kind = "step"

    def queued(self) -> Queued:
        rows, new = self.hidden.shape[:2]
        return Queued(self.id, "step", self.client, rows * (new - self.done), rows, self.session_id, self.waited,
                      True, self.key)


@dataclass(eq=False)
class ForwardJob(Job):
    keep: bool = False
    finish: Callable[[ForwardJob, torch.Tensor], None] | None = None
    reserved: int = 0  # cache tokens reserved for a long forward run in column chunks (0: run by whole rows)

    kind = "forward"

    def queued(self) -> Queued:
        rows, length = self.hidden.shape[:2]
        if self.reserved:  # like a step: all rows, a few columns per pass
            return Queued(self.id, "forward", self.client, rows * (length - self.done), rows, None, self.waited,
                          True, self.key)
        return Queued(self.id, "forward", self.client, (rows - self.done) * length, length, None, self.waited,
                      not self.keep, self.key)


@dataclass(eq=False)
class BackwardJob(Job):
    grad_output: torch.Tensor | None = None
    kept: str | None = None
    run_alone: Callable[[BackwardJob], tuple[dict[str, Any], list[torch.Tensor]]] | None = None

    kind = "backward"

    def queued(self) -> Queued:
        rows, length = self.hidden.shape[:2]
        return Queued(self.id, "backward", self.client, rows * length, rows * length, None, self.waited, False,
                      self.blocks)


class Engine:
    """Runs submitted jobs in passes on its own thread."""

    def __init__(self, span: BlockSpan, limits: PassLimits | None = None, queue: QueueLimits | None = None,
                 budget: CacheBudget | None = None, name: str = "swarm-engine",
                 observe: Callable[[str, float, int, int], None] | None = None):
        self.span = span
        # told of each pass on the engine thread: (kind: step | forward | backward | mixed, seconds, requests, tokens)
        self.observe = observe
        self.budget = budget  # long forwards borrow cache tokens from it to run in chunks
        self.limits = limits or PassLimits()
        self.queue_limits = queue or QueueLimits()
        self._jobs: dict[int, Job] = {}  # queued, in arrival order
        self._bytes = 0
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._recent: deque[tuple[int, int, int]] = deque(maxlen=64)  # (requests, sessions, tokens) of last passes
        self.passes = 0
        self._stepped: dict[str, float] = {}  # session id -> when a step of it last ran (for gathering)
        self._pass_seconds = 0.0  # how long the last shared pass took
        self.run_forward_alone: Callable[[ForwardJob], tuple[dict[str, Any], list[torch.Tensor]]] | None = None

    def start(self) -> Engine:
        self._thread.start()
        return self

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._jobs)

    def stats(self) -> dict[str, Any]:
        """The queue, and the size of recent passes (mean requests, sessions and tokens per pass; the most sessions
        one held)."""
        with self._cond:
            recent = list(self._recent)
            queued, queued_bytes = len(self._jobs), self._bytes
        count = max(1, len(recent))
        return {"queue": queued, "queued_bytes": queued_bytes, "passes": self.passes,
                "batch": {"requests": round(sum(r[0] for r in recent) / count, 2),
                          "sessions": round(sum(r[1] for r in recent) / count, 2),
                          "tokens": round(sum(r[2] for r in recent) / count, 1),
                          "peak_sessions": max((r[1] for r in recent), default=0),
                          "max_tokens": self.limits.max_tokens, "max_requests": self.limits.max_requests}}

    def submit(self, job: Job) -> None:
        """Queue `job`; raises Refused(busy) when the queue is full (for everyone, or for this peer)."""
        limits = self.queue_limits
        with self._cond:
            if self._stopping:
                raise Refused("busy", "server is shutting down and takes no new work")
            if len(self._jobs) >= limits.max_items or self._bytes + job.nbytes > limits.max_bytes:
                raise Refused("busy", f"server is busy: {len(self._jobs)} requests ({self._bytes >> 20} MiB) "
                                          "wait already; try again shortly or use another server")
            mine = [j for j in self._jobs.values() if j.client == job.client]
            if len(mine) + 1 > limits.max_items * limits.client_share \
                    or sum(j.nbytes for j in mine) + job.nbytes > limits.max_bytes * limits.client_share:
                items, nbytes = int(limits.max_items * limits.client_share), int(limits.max_bytes * limits.client_share)
                raise Refused("busy", f"this peer has {len(mine)} requests ({sum(j.nbytes for j in mine) >> 20} MiB) "
                                      f"waiting on this server already, and one peer may have {items} "
                                      f"({nbytes >> 20} MiB); wait for their answers first")
            job.id = next(self._ids)
            job.mix = self.limits.mix_tasks
            if isinstance(job, ForwardJob) and not job.keep and job.hidden.shape[1] > self.limits.max_tokens \
                    and self.budget is not None:
                tokens = job.hidden.shape[0] * job.hidden.shape[1]
                if self.budget.reserve(tokens):  # else it runs by whole rows (its memory is bounded by the limits)
                    job.reserved = tokens
            self._jobs[job.id] = job
            self._bytes += job.nbytes
            self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what is queued (bounded by `timeout`), then stop; what is left is answered `busy`."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:
            left = list(self._jobs.values())
            self._jobs.clear()
        for job in left:
            self._remove(job)
            job.request.fail("busy", "server stopped before running this request")

    # --- the engine thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait(1.0)
                if not self._jobs and self._stopping:
                    return
                self._gather()
                picks = plan_pass([job.queued() for job in self._jobs.values()], self.limits)
                picked = {pick.id for pick in picks}
                for job in self._jobs.values():
                    job.waited = 0 if job.id in picked else job.waited + 1  # passes since it last ran
                jobs = [(self._jobs[pick.id], pick) for pick in picks]
            try:
                self._pass(jobs)
            except Exception:  # a bug in the engine itself: answer the pass's jobs, keep running
                log.exception("a pass failed")
                for job, _ in jobs:
                    self._fail(job, "internal", "the server failed to run this request")

    def _gather(self) -> None:
        """Wait (bounded, on the queue's condition) for more sessions' steps to join the next pass: while steps keep
        coming (each within a tenth of a pass of the last) and the scheduler's `gather_wait` says it is worth it."""
        now = time.monotonic()
        for sid in [sid for sid, at in self._stepped.items() if now - at > 1.0]:
            del self._stepped[sid]
        deadline = None
        gap = max(0.001, 0.1 * self._pass_seconds)
        while not self._stopping:
            queued = {job.session_id for job in self._jobs.values() if isinstance(job, StepJob)}
            wait = gather_wait(len(queued), len(self._stepped), self._pass_seconds, self.limits)
            if wait <= 0 or any(job.waited >= self.limits.starve_after for job in self._jobs.values()):
                return
            deadline = deadline or time.monotonic() + wait
            left = deadline - time.monotonic()
            if left <= 0:
                return
            count = len(self._jobs)
            self._cond.wait(min(left, gap))
            if len(self._jobs) == count:
                return  # nobody came: the others are elsewhere in their chains

    def _pass(self, jobs: list[tuple[Job, Pick]]) -> None:
        if len(jobs) == 1 and isinstance(jobs[0][0], BackwardJob | ForwardJob) and not self._shared(jobs[0][0]):
            job = jobs[0][0]
            self._alone(job)
            return
        works: list[tuple[Job, Work, int]] = []
        for job, pick in jobs:
            try:
                works.append((job, *self._work(job, pick)))
            except SwarmError as e:
                self._fail(job, e.code, str(e))
        if not works:
            return
        tokens = sum(w.hidden.shape[0] * w.hidden.shape[1] for _, w, _ in works)
        self._note(len(works), sum(isinstance(j, StepJob) for j, _, _ in works), tokens)
        started = time.monotonic()
        now = started
        for job, _, _ in works:
            if isinstance(job, StepJob):
                self._stepped[job.session_id] = now
        try:
            with torch.inference_mode():
                outs = self.span.run([w for _, w, _ in works], works[0][0].blocks)
            self._pass_seconds = time.monotonic() - started
            if self.observe is not None:
                kinds = {job.kind for job, _, _ in works}
                self._observed(kinds.pop() if len(kinds) == 1 else "mixed", self._pass_seconds, len(works), tokens)
        except Exception as e:
            if len(works) == 1:
                job = works[0][0]
                self._rewind(job, whole=True)
                log.warning("a request failed: %s: %s", type(e).__name__, e)
                self._fail(job, "internal", f"{type(e).__name__}: {e}")
                return
            log.warning("a pass of %d requests failed (%s); running them one by one", len(works), e)
            for job, _, _ in works:
                self._rewind(job)
            for job, work, count in works:
                try:
                    with torch.inference_mode():
                        out = self.span.run([work], job.blocks)[0]
                except Exception as e2:
                    self._rewind(job, whole=True)
                    self._fail(job, "internal", f"{type(e2).__name__}: {e2}")
                    continue
                self._progress(job, out, count)
            return
        for (job, _, count), out in zip(works, outs, strict=True):
            self._progress(job, out, count)

    @staticmethod
    def _shared(job: Job) -> bool:
        return isinstance(job, ForwardJob) and not job.keep

    def _work(self, job: Job, pick: Pick) -> tuple[Work, int]:
        """The piece of `job` this pass runs, and its size in columns (step) or rows (forward)."""
        if isinstance(job, StepJob):
            rows, new = job.hidden.shape[:2]
            if job.done == 0:
                self._begin_step(job)
            elif job.session.closed:
                raise Refused("unknown_session", f"session {job.session_id[:8]} was closed")
            count = min(new - job.done, max(1, pick.tokens // rows))
            job._cache_start = job.cache.length
            a, b = job.done, job.done + count
            mask = None if job.mask is None else job.mask[:, a:b]
            return Work(job.hidden[:, a:b], mask, job.cache, job.prompts, column=a, tasks=job.tasks), count
        rows, length = job.hidden.shape[:2]
        if isinstance(job, ForwardJob) and job.reserved:
            if job.cache is None:
                job.cache = self.span.new_cache(rows, length, job.blocks)
            count = min(length - job.done, max(1, pick.tokens // rows))
            job._cache_start = job.cache.length
            a, b = job.done, job.done + count
            mask = None if job.mask is None else job.mask[:, a:b]
            return Work(job.hidden[:, a:b], mask, job.cache, job.prompts, column=a, tasks=job.tasks), count
        count = min(rows - job.done, max(1, pick.tokens // length))
        a, b = job.done, job.done + count
        prompts = job.prompts
        if prompts is not None and prompts.shape[1] > 1:
            prompts = prompts[:, a:b]
        mask = None if job.mask is None else job.mask[a:b]
        return Work(job.hidden[a:b], mask, None, prompts, tasks=job.tasks), count

    def _begin_step(self, job: StepJob) -> None:
        """Checks that depend on the session's state when the step starts running; rewinds to `start`."""
        session = job.session
        if session.closed:
            raise Refused("unknown_session", f"session {job.session_id[:8]} was closed")
        if session.cache is None:
            session.cache = self.span.new_cache(session.batch, session.max_length, session.blocks)
        cache = job.cache = session.cache
        if job.start is not None and job.start > cache.length:
            raise Refused("bad_request", f"start {job.start} is past the {cache.length} tokens the session holds")
        position = cache.length if job.start is None else job.start
        new = job.hidden.shape[1]
        if position + new > session.max_length:
            raise Refused("session_overflow", f"step of {new} tokens at position {position} goes past the "
                                                  f"session's max_length {session.max_length}")
        if job.prompts is not None and position != 0:
            raise Refused("bad_request", "prompts may only come with the first step of a session (position 0)")
        if job.start is not None:
            cache.rewind(job.start)
        job._position = position

    def _rewind(self, job: Job, whole: bool = False) -> None:
        """Undo what this pass wrote to a step's cache (`whole`: the whole step, earlier passes too)."""
        if job.cache is not None:
            job.cache.rewind(job._position if whole else job._cache_start)

    def _progress(self, job: Job, out: torch.Tensor, count: int) -> None:
        job.done += count
        job.outputs.append(out.to(job.hidden.device, job.hidden.dtype))  # back where it came from (the CPU)
        by_columns = isinstance(job, StepJob) or bool(getattr(job, "reserved", 0))
        if job.done < job.hidden.shape[1 if by_columns else 0]:
            return
        self._remove(job)
        output = job.outputs[0] if len(job.outputs) == 1 else torch.cat(job.outputs, dim=1 if by_columns else 0)
        try:
            job.finish(job, output)
        except SwarmError as e:
            job.request.fail(e.code, str(e))

    def _alone(self, job: Job) -> None:
        tokens = job.hidden.shape[0] * job.hidden.shape[1]
        self._note(1, 0, tokens)
        self._remove(job)
        started = time.monotonic()
        try:
            if isinstance(job, BackwardJob):
                result = job.run_alone(job)
            else:
                result = self.run_forward_alone(job)
            if self.observe is not None:
                self._observed(job.kind, time.monotonic() - started, 1, tokens)
        except SwarmError as e:
            job.request.fail(e.code, str(e))
        except Exception as e:
            log.exception("a %s failed", job.kind)
            job.request.fail("internal", f"{type(e).__name__}: {e}")
        else:
            job.request.reply(*result)

    def _fail(self, job: Job, code: str, message: str) -> None:
        self._remove(job)
        job.request.fail(code, message)

    def _remove(self, job: Job) -> None:
        with self._cond:
            if self._jobs.pop(job.id, None) is not None:
                self._bytes -= job.nbytes
        done, job.on_done = job.on_done, None
        if done is not None:
            done()
        if isinstance(job, ForwardJob) and job.reserved and self.budget is not None:
            self.budget.release(job.reserved)
            job.reserved, job.cache = 0, None

    def _observed(self, kind: str, seconds: float, requests: int, tokens: int) -> None:
        try:
            self.observe(kind, seconds, requests, tokens)
        except Exception:  # counting must never fail a pass
            log.exception("observing a pass failed")

    def _note(self, requests: int, sessions: int, tokens: int) -> None:
        with self._cond:
            self.passes += 1
            self._recent.append((requests, sessions, tokens))


__all__ = ["BackwardJob", "Engine", "ForwardJob", "Job", "QueueLimits", "Refused", "StepJob"]
