"""The server's protocol: checks every request, answers cheap ones at once, queues compute on the worker.

Requests (message type -> fields / tensors; relayed steps: see relay.py):
- `ping` -> {}                                       (latency probes)
- `info` -> model, span, dtype, protocol, free cache, ...
- `forward` {blocks?, names, keep?} [hidden, attention_mask?, prompts?] -> {kept?} [hidden]
- `backward` {blocks?, names, kept?} [hidden, grad_output, attention_mask?, prompts?] -> [grad_input, grad_prompts?]
- `open` {batch_size, max_length, blocks?} -> {session}
- `step` {session, start?, names, push?} [hidden, attention_mask?, prompts?] -> [hidden]
- `step` {session, start?, names, ticket, wait?, push?} [attention_mask?, prompts?] -> [hidden]  (input pushed)
- `push` {session, ticket, names} [hidden] -> {}     (a relayed step's input, from the previous server)
- `cancel` {session, ticket} -> {cancelled}          (drop a relayed step still waiting for its input)
- `close` {session} -> {}
- `gossip` {records} -> {records}                    (push-pull exchange of server records)
A forward with `keep` keeps its autograd graph (a few, for a while) and answers its id (`kept`); the backward that
names it, with the same inputs, uses it instead of running the blocks again (training costs 2 passes, not 3).
`prompts` are deep-prompt-tuning prompts, one per block computed: [blocks, batch or 1, prompt_length, hidden] (see
backend.py); a step may carry them only at position 0.
Anything a peer sends is validated here and refused with a stable error code; nothing a peer sends can stop the
server or touch another client's session.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ...transport.codec import PROTOCOL_VERSION
from ...transport.errors import ProtocolError, RemoteError
from ...transport.rpc import Request
from .backend import BlockSpan, Graph
from .cache import CacheBudget, SessionCache
from .relay import MAX_WAIT, Mailbox, Relay, parse_push, parse_ticket
from .worker import PRIORITY_BACKWARD, PRIORITY_FORWARD, PRIORITY_STEP, ComputeWorker

log = logging.getLogger(__name__)


class Refused(RemoteError):
    """Raised inside the server to answer a request with an error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message, code=code)
        self.code = code

    def __str__(self) -> str:
        return self.remote_message


@dataclass(frozen=True)
class HandlerLimits:
    max_batch: int = 1024  # sequences in one request or session
    max_request_tokens: int = 1 << 16  # batch x length of one forward/backward/step
    max_session_length: int = 1 << 17  # max_length of a session
    session_timeout: float = 600.0  # seconds a session may stay idle before it is closed
    max_kept: int = 8  # forward passes whose graphs wait for their backward (oldest dropped first; 0: none)
    kept_ttl: float = 120.0  # seconds a kept graph waits for its backward


@dataclass
class Session:
    batch: int
    max_length: int
    blocks: tuple[int, int]
    tokens: int  # cache tokens reserved in the budget
    last_used: float = field(default_factory=time.monotonic)
    cache: SessionCache | None = None


class Handler:
    """Turns requests into answers for one BlockSpan."""

    def __init__(self, span: BlockSpan, worker: ComputeWorker, budget: CacheBudget, model_name: str,
                 limits: HandlerLimits | None = None, extra_info: dict[str, Any] | None = None,
                 on_gossip: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 relay: Relay | None = None, relay_allowed: Callable[[str], bool] = lambda peer: False):
        self.span, self.worker, self.budget = span, worker, budget
        self.model_name = model_name
        self.limits = limits or HandlerLimits()
        self.extra_info = extra_info or {}
        self.on_gossip = on_gossip
        self.relay, self.relay_allowed = relay, relay_allowed
        self.mailbox = Mailbox()  # the halves of relayed steps, waiting for each other
        self.sessions: dict[str, Session] = {}
        self._kept: dict[str, _Kept] = {}  # forward graphs waiting for their backward, oldest first
        self._lock = threading.Lock()
        self.accepting = True

    # --- the I/O thread's entry points -------------------------------------------------------------------------

    def __call__(self, request: Request) -> None:
        kind = request.message.type
        if kind == "ping":
            request.reply()
        elif kind == "info":
            request.reply(self.info())
        elif kind == "gossip" and self.on_gossip is not None:
            request.reply(self.on_gossip(dict(request.message.fields)))
        elif kind == "open":
            request.reply(self.open(request))
        elif kind == "close":
            self.close(_session_id(request))
            request.reply()
        elif kind == "step":
            session_id = _session_id(request)
            self._touch(session_id)
            if "ticket" in request.message.fields:
                self._await_input(session_id, request)
            else:
                self.worker.submit(PRIORITY_STEP, request, lambda: self._step(session_id, request))
        elif kind == "push":
            session_id = _session_id(request)
            self._check_relays()
            self._session(session_id)
            hidden = self._tensors(request, ("hidden",))["hidden"]
            self.mailbox.push(session_id, parse_ticket(request.message.get("ticket")), hidden)
            request.reply()
        elif kind == "cancel":
            cancelled = self.mailbox.cancel(_session_id(request), parse_ticket(request.message.get("ticket")))
            request.reply({"cancelled": cancelled})
        elif kind == "forward":
            self._check_accepting()
            self.worker.submit(PRIORITY_FORWARD, request, lambda: self._forward(request))
        elif kind == "backward":
            self._check_accepting()
            self.worker.submit(PRIORITY_BACKWARD, request, lambda: self._backward(request))
        else:
            raise Refused("unknown_method", f"unknown request type {kind!r}")

    def _await_input(self, session_id: str, request: Request) -> None:
        """A relayed step whose input comes from the previous server: run it once both halves are here."""
        self._session(session_id)
        self._check_relays()
        ticket = parse_ticket(request.message.get("ticket"))
        wait = request.message.get("wait", 60.0)
        if not isinstance(wait, (int, float)) or isinstance(wait, bool) or not 0 < wait <= MAX_WAIT:
            raise Refused("bad_request", f"wait must be a number of seconds in (0, {MAX_WAIT:g}]")

        def start(hidden: torch.Tensor) -> None:
            self.worker.submit(PRIORITY_STEP, request, lambda: self._step(session_id, request, hidden))

        self.mailbox.wait(session_id, ticket, request, start, float(wait))

    def tick(self) -> None:
        """Close sessions idle for longer than the session timeout; drop relayed steps and kept graphs that waited
        too long."""
        self.mailbox.expire()
        now = time.monotonic()
        with self._lock:
            for kid in [k for k, kept in self._kept.items() if kept.deadline < now]:
                del self._kept[kid]
        with self._lock:
            expired = [sid for sid, s in self.sessions.items() if now - s.last_used > self.limits.session_timeout]
        for sid in expired:
            log.info("session %s expired after %.0f s idle", sid[:8], self.limits.session_timeout)
            self.close(sid)

    def info(self) -> dict[str, Any]:
        span = self.span
        with self._lock:
            sessions = len(self.sessions)
        return {
            "model": self.model_name,
            "family": span.family.name,
            "start": span.start,
            "end": span.end,
            "num_blocks": span.family.num_blocks(span.config),
            "hidden_size": span.hidden_size,
            "dtype": str(span.dtype).removeprefix("torch."),
            "protocol": PROTOCOL_VERSION,
            "cache_tokens_total": self.budget.total,
            "cache_tokens_free": self.budget.free,
            "sessions": sessions,
            "kept_graphs": len(self._kept),
            "queue": self.worker.pending,
            "accepting": self.accepting,
            "max_batch": self.limits.max_batch,
            "max_request_tokens": self.limits.max_request_tokens,
            **self.extra_info,
        }

    def open(self, request: Request) -> dict[str, Any]:
        self._check_accepting()
        msg = request.message
        batch = _int(msg.get("batch_size", 1), "batch_size", 1, self.limits.max_batch)
        max_length = _int(msg.get("max_length"), "max_length", 1, self.limits.max_session_length)
        blocks = self._blocks(msg.get("blocks"))
        tokens = batch * max_length
        if not self.budget.reserve(tokens):
            raise Refused("cache_full", f"cache full: the session needs {tokens} cache tokens (batch {batch} x "
                                        f"max_length {max_length}) and {self.budget.free} of "
                                        f"{self.budget.total} are free; try a shorter max_length or another server")
        session_id = secrets.token_hex(16)
        with self._lock:
            self.sessions[session_id] = Session(batch, max_length, blocks, tokens)
        return {"session": session_id, "cache_tokens_free": self.budget.free}

    def close(self, session_id: str) -> None:
        with self._lock:
            session = self.sessions.pop(session_id, None)
        if session is not None:
            self.budget.release(session.tokens)
            session.cache = None
            self.mailbox.drop_session(session_id)

    def close_all(self) -> None:
        with self._lock:
            ids = list(self.sessions)
        for sid in ids:
            self.close(sid)

    # --- checks ------------------------------------------------------------------------------------------------

    def _session(self, session_id: str) -> Session:
        with self._lock:
            session = self.sessions.get(session_id)
        if session is None:
            raise Refused("unknown_session", f"unknown session {session_id[:8]} (it expired, was closed, or the "
                                             "server restarted)")
        return session

    def _check_relays(self) -> None:
        if self.relay is None:
            raise Refused("relay_refused", "this server does not relay")

    def _check_accepting(self) -> None:
        if not self.accepting:
            raise Refused("busy", "server is shutting down and takes no new work")

    def _touch(self, session_id: str) -> None:
        with self._lock:
            session = self.sessions.get(session_id)
            if session is not None:
                session.last_used = time.monotonic()

    def _blocks(self, value: Any) -> tuple[int, int]:
        span = self.span
        if value is None:
            return span.start, span.end
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise Refused("bad_request", "blocks must be [start, end]")
        start, end = value
        if not span.start <= start < end <= span.end:
            raise Refused("bad_request", f"blocks {start}:{end} are not within this server's span "
                                         f"{span.start}:{span.end}")
        return start, end

    def _tensors(self, request: Request, required: tuple[str, ...], optional: tuple[str, ...] = ()
                 ) -> dict[str, torch.Tensor]:
        msg = request.message
        names = msg.get("names", list(required[: len(msg.tensors)]))
        if not isinstance(names, list) or len(names) != len(msg.tensors) or len(set(map(str, names))) != len(names):
            raise Refused("bad_request", "field 'names' must name each tensor of the message once")
        tensors = dict(zip(map(str, names), msg.tensors, strict=True))
        missing = [n for n in required if n not in tensors]
        unknown = [n for n in tensors if n not in required + optional]
        if missing or unknown:
            raise Refused("bad_request", f"expected tensors {list(required)} (optional {list(optional)}), "
                                         f"got {list(tensors)}")
        return tensors

    def _hidden(self, hidden: torch.Tensor, name: str = "hidden") -> torch.Tensor:
        if hidden.dim() != 3 or not hidden.is_floating_point():
            raise Refused("bad_request", f"{name} must be a float tensor [batch, length, hidden], got "
                                         f"{str(hidden.dtype).removeprefix('torch.')}{list(hidden.shape)}")
        batch, length, size = hidden.shape
        if size != self.span.hidden_size:
            raise Refused("bad_request", f"{name} has hidden size {size}, this model's is {self.span.hidden_size}")
        if batch < 1 or length < 1 or batch > self.limits.max_batch:
            raise Refused("bad_request", f"{name} has batch {batch} and length {length}; both must be at least 1 "
                                         f"and batch at most {self.limits.max_batch}")
        if batch * length > self.limits.max_request_tokens:
            raise Refused("bad_request", f"{batch * length} tokens in one request; the limit is "
                                         f"{self.limits.max_request_tokens}")
        if not torch.isfinite(hidden.to(self.span.dtype)).all():
            raise Refused("bad_request", f"{name} has NaN or infinite values")
        return hidden

    @staticmethod
    def _mask(tensors: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor | None:
        mask = tensors.get("attention_mask")
        if mask is None:
            return None
        if mask.is_floating_point() or mask.shape != hidden.shape[:2]:
            raise Refused("bad_request", f"attention_mask must be an integer tensor {list(hidden.shape[:2])}")
        if ((mask != 0) & (mask != 1)).any():
            raise Refused("bad_request", "attention_mask must hold only 0 and 1")
        return mask.long()

    # --- compute, on the worker thread -------------------------------------------------------------------------

    def _prompts(self, tensors: dict[str, torch.Tensor], hidden: torch.Tensor, blocks: tuple[int, int]
                 ) -> torch.Tensor | None:
        prompts = tensors.get("prompts")
        if prompts is None:
            return None
        count, (batch, length, size) = blocks[1] - blocks[0], hidden.shape
        if (prompts.dim() != 4 or not prompts.is_floating_point() or prompts.shape[0] != count
                or prompts.shape[1] not in (1, batch) or not 0 < prompts.shape[2] <= length
                or prompts.shape[3] != size):
            raise Refused("bad_request", f"prompts must be a float tensor [{count}, 1 or {batch}, 1..{length}, {size}] "
                                         f"(one per block), got {str(prompts.dtype).removeprefix('torch.')}"
                                         f"{list(prompts.shape)}")
        if not torch.isfinite(prompts.to(self.span.dtype)).all():
            raise Refused("bad_request", "prompts have NaN or infinite values")
        return prompts

    def _forward(self, request: Request) -> tuple[dict[str, Any], list[torch.Tensor]]:
        tensors = self._tensors(request, ("hidden",), ("attention_mask", "prompts"))
        hidden = self._hidden(tensors["hidden"])
        mask = self._mask(tensors, hidden)
        blocks = self._blocks(request.message.get("blocks"))
        prompts = self._prompts(tensors, hidden, blocks)
        keep = request.message.get("keep", False)
        if not isinstance(keep, bool):
            raise Refused("bad_request", "keep must be true or false")
        if keep and self.limits.max_kept > 0:
            graph = self.span.forward_graph(hidden, mask, blocks, prompts)
            kid = secrets.token_hex(12)
            with self._lock:
                self._kept[kid] = _Kept(graph, mask, blocks, time.monotonic() + self.limits.kept_ttl)
                while len(self._kept) > self.limits.max_kept:
                    del self._kept[next(iter(self._kept))]
            return {"kept": kid}, [graph.out.detach().to(hidden.dtype)]
        with torch.inference_mode():
            out = self.span(hidden, mask, blocks, prompts)
        return {}, [out.to(hidden.dtype)]

    def _backward(self, request: Request) -> tuple[dict[str, Any], list[torch.Tensor]]:
        tensors = self._tensors(request, ("hidden", "grad_output"), ("attention_mask", "prompts"))
        hidden = self._hidden(tensors["hidden"])
        grad_output = self._hidden(tensors["grad_output"], "grad_output")
        if grad_output.shape != hidden.shape:
            raise Refused("bad_request", "grad_output must have the shape of hidden")
        mask = self._mask(tensors, hidden)
        blocks = self._blocks(request.message.get("blocks"))
        prompts = self._prompts(tensors, hidden, blocks)
        graph = self._kept_graph(request.message.get("kept"), hidden, mask, blocks, prompts)
        grad, grad_prompts = self.span.backward(hidden, grad_output, mask, blocks, prompts, graph)
        if grad_prompts is None:
            return {}, [grad.to(hidden.dtype)]
        return {"names": ["grad_input", "grad_prompts"]}, [grad.to(hidden.dtype), grad_prompts.to(prompts.dtype)]

    def _kept_graph(self, kid: Any, hidden: torch.Tensor, mask: torch.Tensor | None, blocks: tuple[int, int],
                    prompts: torch.Tensor | None) -> Graph | None:
        """The kept graph of the forward `kid`, if it is still here and ran on exactly these inputs."""
        if kid is None:
            return None
        if not isinstance(kid, str):
            raise Refused("bad_request", "kept must be the id a forward answered")
        with self._lock:
            kept = self._kept.pop(kid, None)
        if kept is None:
            return None  # expired or dropped: run the forward again
        graph = kept.graph
        same = (kept.blocks == blocks and _same(graph.inputs, hidden) and _same(kept.mask, mask)
                and _same(graph.prompts, prompts))
        return graph if same else None

    def _step(self, session_id: str, request: Request, pushed: torch.Tensor | None = None,
              ) -> tuple[dict[str, Any], list[torch.Tensor]]:
        session = self._session(session_id)
        if pushed is None:
            tensors = self._tensors(request, ("hidden",), ("attention_mask", "prompts"))
        else:
            tensors = {**self._tensors(request, (), ("attention_mask", "prompts")), "hidden": pushed}
        hidden = self._hidden(tensors["hidden"])
        mask = self._mask(tensors, hidden)
        if session.cache is None:
            session.cache = self.span.new_cache(session.batch, session.max_length, session.blocks)
        cache = session.cache
        start = request.message.get("start")
        if start is not None:
            start = _int(start, "start", 0, cache.length)
        batch, new, _ = hidden.shape
        if batch != session.batch:
            raise Refused("bad_request", f"the session has batch size {session.batch}, the step has {batch}")
        position = cache.length if start is None else start
        if position + new > session.max_length:
            raise Refused("session_overflow", f"step of {new} tokens at position {position} goes past the "
                                              f"session's max_length {session.max_length}")
        prompts = self._prompts(tensors, hidden, session.blocks)
        if prompts is not None and position != 0:
            raise Refused("bad_request", "prompts may only come with the first step of a session (position 0)")
        push = request.message.get("push")
        if push is not None:
            self._check_relays()
            target = parse_push(push, self.relay_allowed)
        if start is not None:
            cache.rewind(start)
        out = self.span.step(hidden, cache, mask, prompts).to(hidden.dtype)
        session.last_used = time.monotonic()
        if push is not None:
            self.relay.push(target, out)  # first: the next server is on the critical path, the client is not
        return {"position": cache.length}, [out]


@dataclass
class _Kept:
    graph: Graph
    mask: torch.Tensor | None
    blocks: tuple[int, int]
    deadline: float


def _same(kept: torch.Tensor | None, given: torch.Tensor | None) -> bool:
    """Whether a kept tensor holds exactly the values given now (both absent counts as the same)."""
    if kept is None or given is None:
        return kept is None and given is None
    return kept.shape == given.shape and torch.equal(kept.detach(), given.to(kept.dtype))


def _int(value: Any, name: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise Refused("bad_request", f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _session_id(request: Request) -> str:
    session_id = request.message.get("session")
    if not isinstance(session_id, str) or not 0 < len(session_id) <= 64:
        raise Refused("bad_request", "field 'session' must be a session id string")
    return session_id


__all__ = ["Handler", "HandlerLimits", "Refused", "ProtocolError"]
