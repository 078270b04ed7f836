"""The server's protocol: turns each request into a typed, validated work item on the I/O thread, answers cheap
requests at once, and queues compute on the engine (engine.py), which runs it in passes with others' work.

Requests and their fields are the types of `transport/messages.py` (validated there once, on arrival); what depends on
this server (its span, hidden size, limits, sessions, values finite in its dtype) is checked here, also on arrival,
so a malformed request is refused before it is queued and queued bytes are bounded (`busy` past the bound).
A forward with `keep` keeps its autograd graph (a few, for a while) and answers its id (`kept`); the backward that
names it, with the same inputs, uses it instead of running the blocks again (training costs 2 passes, not 3).
`prompts` are deep-prompt-tuning prompts, one per block computed: [blocks, batch or 1, prompt_length, hidden] (see
backend.py); a step may carry them only at position 0.
`adapter` (open, forward, backward) names an adapter the server holds or loads on first use (adapters.py); a session's
steps run with the adapter it opened with, which stays loaded while the session lives. A client's own LoRA (`lora`)
comes with forward/backward (its gradients go back with the backward) or with `open` (kept with the session).
Hidden states and gradients may come compressed and a request may ask its reply compressed (transport/packing.py,
with the codecs of quant/compression.py this server accepts: `ServerConfig.compression`, announced as capabilities
`compress.NAME`): they are decoded on arrival, before any other check (which then sees plain tensors), and the reply is
packed as asked; a relayed step's `push` names the codec its output is pushed to the next server in.
Nothing a peer sends can stop the server or touch another client's session. A step that is refused or fails does not
count as activity of its session (only answered steps keep a session from expiring).

Limits per peer (`Request.peer`: a CURVE key, a remote address, or one loopback connection) keep one peer from taking
what others need: open sessions (`busy` past `max_peer_sessions`), cache tokens (`cache_full` past its share of the
budget) and clients' LoRAs kept with sessions (`busy` past its share); the engine bounds each peer's queued requests
and bytes (`busy`). A refusal names the limit and leaves everyone else's work as it was. Kept forward graphs are not
refused but evicted: past the bounds (count or bytes) the oldest graph of the peer that keeps the most goes first,
so a peer that keeps many graphs evicts its own, never a smaller holder's. `info` reports the limits (`peer_limits`).
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ...quant.compression import WireCodecs
from ...transport.codec import PROTOCOL_VERSION
from ...transport.errors import ProtocolError, SwarmError
from ...transport.messages import (
    CAPABILITIES,
    DEFAULT_WAIT,
    Backward,
    BackwardReply,
    Cancel,
    CancelReply,
    Close,
    Forward,
    ForwardReply,
    Info,
    LoraWeights,
    Open,
    OpenReply,
    Ping,
    Push,
    Step,
    StepReply,
    parse_request,
    require_finite,
)
from ...transport.packing import asked, capabilities, pack, read_codec, unpack
from ...transport.rpc import Request
from ..adapters import Task, lora_from_stacked
from .adapters import AdapterStore
from .backend import BlockSpan, Graph
from .cache import CacheBudget, SessionCache
from .engine import BackwardJob, Engine, ForwardJob, Job, Refused, StepJob
from .relay import Mailbox, Relay

log = logging.getLogger(__name__)

CLIENT_LORA = "client LoRA"  # the name of a task built from a client's own LoRA (no adapter name has a space)


@dataclass(frozen=True)
class HandlerLimits:
    max_batch: int = 1024  # sequences in one request or session
    max_request_tokens: int = 1 << 16  # batch x length of one forward/backward/step
    max_session_length: int = 1 << 17  # max_length of a session
    session_timeout: float = 600.0  # seconds a session may stay idle before it is closed
    max_kept: int = 8  # forward passes whose graphs wait for their backward (oldest dropped first; 0: none)
    max_kept_bytes: int = 1 << 30  # what the tensors those graphs saved for their backward may take together
    kept_ttl: float = 120.0  # seconds a kept graph waits for its backward
    max_pass_bytes: int = 256 << 20  # memory one sequence's attention mask may take in a forward/backward pass
    max_lora_bytes: int = 64 << 20  # a client's own LoRA in one request (or kept with a session)
    max_session_lora_bytes: int = 256 << 20  # all clients' LoRAs kept with open sessions, together
    max_peer_sessions: int = 128  # sessions one peer (Request.peer) may hold open at once
    peer_share: float = 0.5  # what one peer may hold of the cache budget and of the sessions' LoRA bytes, so that
    #                          others who come later find room
    peer_cache_tokens: int = 4096  # a peer may always hold this many cache tokens whatever its share (one long
    #                                session on a small server), within the budget

    @property
    def max_forward_length(self) -> int:
        """The longest sequence a forward or backward may hold: its dense mask (length^2 floats) fits the bound."""
        return max(1, math.isqrt(self.max_pass_bytes // 4))

    def peer_cache_limit(self, total: int) -> int:
        """The cache tokens one peer may hold of a budget of `total`: its share, and never less than
        `peer_cache_tokens` (when the budget has them)."""
        return max(int(total * self.peer_share), min(total, self.peer_cache_tokens))

    @property
    def peer_lora_limit(self) -> int:
        """The bytes of one peer's LoRAs kept with its sessions: its share, and at least one LoRA of the largest
        size a request may carry (within the bound of all of them)."""
        total = self.max_session_lora_bytes
        return max(int(total * self.peer_share), min(total, self.max_lora_bytes))


@dataclass
class Session:
    batch: int
    max_length: int
    blocks: tuple[int, int]
    tokens: int  # cache tokens reserved in the budget
    last_used: float = field(default_factory=time.monotonic)
    cache: SessionCache | None = None
    closed: bool = False
    tasks: tuple[Task, ...] = ()  # the adapter its steps run with
    adapter: str | None = None  # the named adapter it holds (released at close)
    lora_bytes: int = 0  # of the client's own LoRA it keeps
    peer: str = ""  # who opened it (Request.peer), for the limits per peer


class Handler:
    """Turns requests into answers for one BlockSpan."""

    def __init__(self, span: BlockSpan, engine: Engine, budget: CacheBudget, model_name: str,
                 limits: HandlerLimits | None = None, extra_info: dict[str, Any] | None = None,
                 on_gossip: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 relay: Relay | None = None, relay_allowed: Callable[[str], bool] = lambda peer: False,
                 adapters: AdapterStore | None = None, peer_limits: dict[str, int] | None = None,
                 codecs: WireCodecs | None = None):
        self.span, self.engine, self.budget = span, engine, budget
        self.codecs = codecs or WireCodecs()  # the compressions this server decodes and sends (announced)
        self._peer_limits = peer_limits or {}  # limits per peer kept elsewhere (the socket's), for `info`
        self.adapters = adapters
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
        engine.run_forward_alone = self._forward_kept
        # the blocks' own tensors: a graph saves them too, but keeping it costs no memory for them
        self._weights = {t.untyped_storage().data_ptr() for t in (*span.parameters(), *span.buffers())}

    @property
    def capabilities(self) -> tuple[str, ...]:
        """What this server does, announced in `info` and its record ("batching": steps of sessions share passes)."""
        batching = ("batching",) if self.engine.limits.max_requests > 1 else ()
        return (*CAPABILITIES, *batching, *capabilities(self.codecs.names))

    # --- the I/O thread's entry points -------------------------------------------------------------------------

    def __call__(self, request: Request) -> None:
        if request.message.type == "gossip" and self.on_gossip is not None:
            request.reply(self.on_gossip(dict(request.message.fields)))
            return
        message = parse_request(self._unpacked(request))
        if isinstance(message, Ping):
            request.reply()
        elif isinstance(message, Info):
            request.reply(self.info())
        elif isinstance(message, Open):
            self._open(request, message)
        elif isinstance(message, Close):
            self.close(message.session)
            request.reply()
        elif isinstance(message, Step):
            self._step(request, message)
        elif isinstance(message, Push):
            self._check_relays()
            self._session(message.session)
            self.mailbox.push(message.session, message.ticket, message.hidden, request.peer)
            request.reply()
        elif isinstance(message, Cancel):
            request.reply(*CancelReply(self.mailbox.cancel(message.session, message.ticket)).to_wire())
        elif isinstance(message, Forward):
            self._forward(request, message)
        elif isinstance(message, Backward):
            self._backward(request, message)

    def _unpacked(self, request: Request) -> Any:
        """The request's message with its compressed tensors decoded; when it asks for a compressed reply, its reply
        is packed so (packing.py). A malformed compressed tensor or an unknown codec is a ProtocolError."""
        codec = asked(request.message, self.codecs)
        message = unpack(request.message, self.codecs)
        if codec is not None:
            codecs = self.codecs
            request.encode_reply = lambda fields, tensors: pack(fields, tensors, codec, codecs)
        return message

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
            "device": span.device.type,
            "quant": span.quant,
            "protocol": PROTOCOL_VERSION,
            "capabilities": list(self.capabilities),
            "cache_tokens_total": self.budget.total,
            "cache_tokens_free": self.budget.free,
            "sessions": sessions,
            "kept_graphs": len(self._kept),
            "kept_bytes": sum(k.nbytes for k in list(self._kept.values())),
            **self.engine.stats(),
            "accepting": self.accepting,
            "adapters": [] if self.adapters is None else self.adapters.names(),
            "adapter_memory": None if self.adapters is None else self.adapters.stats(),
            "max_batch": self.limits.max_batch,
            "max_request_tokens": self.limits.max_request_tokens,
            "max_forward_length": self.limits.max_forward_length,
            "peer_limits": self.peer_limits(),
            **self.extra_info,
        }

    def peer_limits(self) -> dict[str, int]:
        """What one peer may hold here (what a refusal refers to): sessions, cache tokens, bytes of LoRAs kept with
        sessions, requests and bytes waiting in the queue; and what all peers' kept graphs may take (evicted, the
        biggest holder's first, past these)."""
        limits, queue = self.limits, self.engine.queue_limits
        return {"sessions": limits.max_peer_sessions, "cache_tokens": limits.peer_cache_limit(self.budget.total),
                "session_lora_bytes": limits.peer_lora_limit,
                "queued_requests": int(queue.max_items * queue.client_share),
                "queued_bytes": int(queue.max_bytes * queue.client_share),
                "kept_graphs": limits.max_kept, "kept_bytes": limits.max_kept_bytes, **self._peer_limits}

    def _open(self, request: Request, message: Open) -> None:
        self._check_accepting()
        _int(message.batch_size, "batch_size", 1, self.limits.max_batch)
        _int(message.max_length, "max_length", 1, self.limits.max_session_length)
        blocks = self._blocks(message.blocks)
        tasks = self._lora_task(self._lora(message.lora, blocks), blocks)

        def opened(adapter: Task | None) -> None:
            reply = self.open(message, (*([] if adapter is None else [adapter]), *tasks), request.peer)
            request.reply(*reply.to_wire())

        self._with_adapter(request, message.adapter, opened, hold=True)

    def open(self, message: Open, tasks: tuple[Task, ...] = (), peer: str = "") -> OpenReply:
        """A new session for `peer` (its adapter, when it has one, already held for it)."""
        self._check_accepting()
        batch = _int(message.batch_size, "batch_size", 1, self.limits.max_batch)
        max_length = _int(message.max_length, "max_length", 1, self.limits.max_session_length)
        blocks = self._blocks(message.blocks)
        tokens = batch * max_length
        lora_bytes = sum(t.nbytes for t in tasks if t.name == CLIENT_LORA)
        session_id = secrets.token_hex(16)
        limits = self.limits
        with self._lock:  # the checks and the reservation at once: concurrent opens of one peer cannot pass together
            mine = [s for s in self.sessions.values() if s.peer == peer]
            if len(mine) >= limits.max_peer_sessions:
                raise Refused("busy", f"this peer holds {len(mine)} open sessions here, the most one peer may "
                                      f"(max_peer_sessions); close one first, or use another server")
            held, cap = sum(s.tokens for s in mine), limits.peer_cache_limit(self.budget.total)
            if held + tokens > cap and tokens <= self.budget.free:  # (when it does not fit at all, say that below)
                raise Refused("cache_full", f"cache full for this peer: its sessions hold {held} cache tokens and "
                                            f"this one needs {tokens} (batch {batch} x max_length {max_length}); one "
                                            f"peer may hold {cap} of this server's {self.budget.total}, so that "
                                            "others find room; close a session, or try another server")
            mine_lora, all_lora = sum(s.lora_bytes for s in mine), sum(s.lora_bytes for s in self.sessions.values())
            if all_lora + lora_bytes > limits.max_session_lora_bytes:
                raise Refused("busy", f"sessions keep {all_lora >> 20} MiB of clients' LoRAs here already; open this "
                                      "one elsewhere, or later")
            if lora_bytes and mine_lora + lora_bytes > limits.peer_lora_limit:
                raise Refused("busy", f"this peer's sessions keep {mine_lora >> 20} MiB of its LoRAs here, and one "
                                      f"peer may keep {limits.peer_lora_limit >> 20} MiB; close one of its "
                                      "sessions first, or use another server")
            if not self.budget.reserve(tokens):
                raise Refused("cache_full", f"cache full: the session needs {tokens} cache tokens (batch {batch} x "
                                            f"max_length {max_length}) and {self.budget.free} of "
                                            f"{self.budget.total} are free; try a shorter max_length or another "
                                            "server")
            self.sessions[session_id] = Session(batch, max_length, blocks, tokens, tasks=tasks,
                                                adapter=message.adapter, lora_bytes=lora_bytes, peer=peer)
        return OpenReply(session_id, self.budget.free)

    def _with_adapter(self, request: Request, name: str | None, then: Callable[[Task | None], None],
                      hold: bool = False) -> None:
        """`then(adapter)` once adapter `name` is loaded (at once when it is, or when there is none); a failure to
        load it answers the request."""
        if name is None:
            then(None)
            return
        if self.adapters is None:
            raise Refused("unknown_adapter", f"this server serves no adapters (asked for {name!r})")

        store = self.adapters

        def loaded(task: Task | None, error: Refused | None) -> None:
            if error is not None:
                request.fail(error.code, str(error))
                return
            try:
                then(task)  # it keeps the hold (a session, a queued request) or gives it back
            except SwarmError as e:
                if hold:
                    store.release(name)
                request.fail(e.code, str(e))

        store.get(name, loaded, hold=hold)

    def close(self, session_id: str) -> None:
        with self._lock:
            session = self.sessions.pop(session_id, None)
        if session is not None:
            session.closed = True
            if session.adapter is not None and self.adapters is not None:
                self.adapters.release(session.adapter)
            self.budget.release(session.tokens)
            session.cache = None
            self.mailbox.drop_session(session_id)

    def close_all(self) -> None:
        with self._lock:
            ids = list(self.sessions)
        for sid in ids:
            self.close(sid)

    # --- turning requests into work items ----------------------------------------------------------------------

    def _step(self, request: Request, message: Step) -> None:
        session = self._session(message.session)
        if message.push is not None:
            self._check_relays()
            if not self.relay_allowed(message.push.peer):
                raise Refused("relay_refused", f"will not relay to {message.push.peer}: it is not a server of this "
                                               "swarm known here")
            read_codec(message.push.compress, self.codecs, "step: relay push's compress")
        if not message.relayed:
            self._submit_step(request, message, session, message.hidden)
            return
        self._check_relays()

        def start(hidden: torch.Tensor) -> None:  # on the I/O thread, when the pushed input is here
            try:
                self._submit_step(request, message, session, hidden)
            except SwarmError as e:
                request.fail(e.code, str(e))

        self.mailbox.wait(message.session, message.ticket, request, start, message.wait or DEFAULT_WAIT)

    def _submit_step(self, request: Request, message: Step, session: Session, hidden: torch.Tensor) -> None:
        hidden = self._hidden(hidden)
        batch, new, _ = hidden.shape
        if batch != session.batch:
            raise Refused("bad_request", f"the session has batch size {session.batch}, the step has {batch}")
        if new > session.max_length:
            raise Refused("session_overflow", f"step of {new} tokens goes past the session's max_length "
                                              f"{session.max_length}")
        mask = self._mask(message.attention_mask, hidden)
        prompts = self._prompts(message.prompts, hidden, session.blocks)
        if prompts is not None and message.start not in (None, 0):
            raise Refused("bad_request", "prompts may only come with the first step of a session (position 0)")
        self._submit(StepJob(request, request.peer, hidden, mask, prompts, session.blocks, tasks=session.tasks,
                             adapter=session.adapter, session=session, session_id=message.session,
                             start=message.start,
                             finish=lambda job, out: self._finish_step(job, message, out)))

    def _finish_step(self, job: StepJob, message: Step, out: torch.Tensor) -> None:
        session = job.session
        session.last_used = time.monotonic()  # only answered steps count as activity
        if message.push is not None and self.relay is not None:
            self.relay.push(message.push, out)  # first: the next server is on the critical path, the client is not
        cache = session.cache
        job.request.reply(*StepReply(out, 0 if cache is None else cache.length).to_wire())

    def _forward(self, request: Request, message: Forward) -> None:
        self._check_accepting()
        hidden = self._hidden(message.hidden, forward=True)
        blocks = self._blocks(message.blocks)
        mask = self._mask(message.attention_mask, hidden)
        prompts = self._prompts(message.prompts, hidden, blocks)
        keep = message.keep and self.limits.max_kept > 0
        lora = self._lora(message.lora, blocks)

        def submit(adapter: Task | None) -> None:
            served = () if adapter is None else (adapter,)
            tasks = served if keep else (*served, *self._lora_task(lora, blocks))
            self._submit(ForwardJob(request, request.peer, hidden, mask, prompts, blocks, tasks=tasks,
                                    lora=lora if keep else None, adapter=message.adapter, keep=keep,
                                    on_done=self._releaser(message.adapter),
                                    finish=lambda job, out: job.request.reply(*ForwardReply(out).to_wire())))

        self._with_adapter(request, message.adapter, submit, hold=True)

    def _backward(self, request: Request, message: Backward) -> None:
        self._check_accepting()
        hidden = self._hidden(message.hidden, forward=True)
        self._hidden(message.grad_output, "grad_output")
        blocks = self._blocks(message.blocks)
        mask = self._mask(message.attention_mask, hidden)
        prompts = self._prompts(message.prompts, hidden, blocks)
        lora = self._lora(message.lora, blocks)

        def submit(adapter: Task | None) -> None:
            self._submit(BackwardJob(request, request.peer, hidden, mask, prompts, blocks,
                                     tasks=() if adapter is None else (adapter,), lora=lora, adapter=message.adapter,
                                     on_done=self._releaser(message.adapter), grad_output=message.grad_output,
                                     kept=message.kept, run_alone=self._backward_run))

        self._with_adapter(request, message.adapter, submit, hold=True)

    def _submit(self, job: Job) -> None:
        self.engine.submit(job)  # raises Refused (busy) when the queue is full

    def _releaser(self, adapter: str | None) -> Callable[[], None] | None:
        """What gives back the hold a request took on its adapter, once it is answered."""
        if adapter is None or self.adapters is None:
            return None
        store = self.adapters
        return lambda: store.release(adapter)

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

    def _blocks(self, value: tuple[int, int] | None) -> tuple[int, int]:
        span = self.span
        if value is None:
            return span.start, span.end
        start, end = value
        if not span.start <= start < end <= span.end:
            raise Refused("wrong_blocks", f"blocks {start}:{end} are not within this server's span "
                                          f"{span.start}:{span.end}")
        return start, end

    def _hidden(self, hidden: torch.Tensor, name: str = "hidden", forward: bool = False) -> torch.Tensor:
        batch, length, size = hidden.shape
        if size != self.span.hidden_size:
            raise Refused("bad_request", f"{name} has hidden size {size}, this model's is {self.span.hidden_size}")
        if batch > self.limits.max_batch:
            raise Refused("bad_request", f"{name} has batch {batch}; the limit is {self.limits.max_batch}")
        if batch * length > self.limits.max_request_tokens:
            raise Refused("bad_request", f"{batch * length} tokens in one request; the limit is "
                                         f"{self.limits.max_request_tokens}")
        if forward and length > self.limits.max_forward_length:
            raise Refused("bad_request", f"sequences of {length} tokens do not fit this server's pass memory (the "
                                         f"limit is {self.limits.max_forward_length}); split them")
        _finite(name, hidden, self.span.dtype)
        return hidden

    @staticmethod
    def _mask(mask: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor | None:
        if mask is None:
            return None
        if mask.shape != hidden.shape[:2]:
            raise Refused("bad_request", f"attention_mask must be an integer tensor {list(hidden.shape[:2])}")
        return mask.long()

    def _prompts(self, prompts: torch.Tensor | None, hidden: torch.Tensor, blocks: tuple[int, int]
                 ) -> torch.Tensor | None:
        if prompts is None:
            return None
        count, (batch, length, size) = blocks[1] - blocks[0], hidden.shape
        if (prompts.shape[0] != count or prompts.shape[1] not in (1, batch) or not 0 < prompts.shape[2] <= length
                or prompts.shape[3] != size):
            raise Refused("bad_request", f"prompts must be a float tensor [{count}, 1 or {batch}, 1..{length}, {size}] "
                                         f"(one per block), got {list(prompts.shape)}")
        _finite("prompts", prompts, self.span.dtype)
        return prompts

    def _lora(self, lora: LoraWeights | None, blocks: tuple[int, int]) -> LoraWeights | None:
        """A client's LoRA, checked against the blocks' linear layers (names, in and out sizes, finite values)."""
        if lora is None:
            return None
        if lora.blocks != blocks[1] - blocks[0]:
            raise Refused("bad_request", f"the LoRA has {lora.blocks} blocks; the request runs blocks "
                                         f"{blocks[0]}:{blocks[1]} ({blocks[1] - blocks[0]})")
        if lora.nbytes > self.limits.max_lora_bytes:
            raise Refused("bad_request", f"the LoRA takes {lora.nbytes} bytes; the limit is "
                                         f"{self.limits.max_lora_bytes}")
        for block in range(*blocks):
            linears = self.span.linears(block)
            for module, a in lora.a.items():
                shape = linears.get(module)
                if shape is None:
                    raise Refused("bad_request", f"lora_a.{module}: block {block} has no linear layer {module!r} "
                                                 f"(it has {', '.join(sorted(linears))})")
                if a.shape[2] != shape[0] or lora.b[module].shape[1] != shape[1]:
                    raise Refused("bad_request", f"lora_a.{module} / lora_b.{module} must be [blocks, r, "
                                                 f"{shape[0]}] / [blocks, {shape[1]}, r] for this model, got "
                                                 f"{list(a.shape)} / {list(lora.b[module].shape)}")
        for name, t in lora.tensors().items():
            _finite(name, t, self.span.dtype)
        return lora

    def _lora_task(self, lora: LoraWeights | None, blocks: tuple[int, int]) -> tuple[Task, ...]:
        """A checked LoRA of a client (`_lora`) as a task for shared passes."""
        if lora is None:
            return ()
        dtype, device = self.span.dtype, self.span.device
        return (lora_from_stacked(blocks[0], lora.scaling, {m: t.to(device, dtype) for m, t in lora.a.items()},
                                  {m: t.to(device, dtype) for m, t in lora.b.items()}, CLIENT_LORA),)

    # --- training passes, run alone on the engine thread ---------------------------------------------------------

    def _forward_kept(self, job: ForwardJob) -> tuple[dict[str, Any], list[torch.Tensor]]:
        saved = 0

        weights = self._weights

        def count(tensor: torch.Tensor) -> torch.Tensor:  # what autograd keeps for the backward (not the weights)
            nonlocal saved
            if tensor.untyped_storage().data_ptr() not in weights:
                saved += tensor.nbytes
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
            graph = self.span.forward_graph(job.hidden, job.mask, job.blocks, job.prompts, job.tasks, job.lora)
        out = graph.out.detach().to(job.hidden.device, job.hidden.dtype)
        limits = self.limits
        if saved > limits.max_kept_bytes:  # too big to keep: its backward runs the blocks again
            return ForwardReply(out).to_wire()
        kid = secrets.token_hex(12)
        with self._lock:
            self._kept[kid] = _Kept(graph, job.mask, job.blocks, time.monotonic() + limits.kept_ttl, job.adapter,
                                    saved, str(job.client))
            self._evict_kept()
        return ForwardReply(out, kid).to_wire()

    def _evict_kept(self) -> None:
        """Drop kept graphs until they fit the bounds (count, then bytes): each time the oldest graph of the peer
        that keeps the most (graphs, then bytes), so a peer's graphs go to make room for its own, never for a bigger
        holder's (call with `_lock` held)."""
        limits, kept = self.limits, self._kept
        for over, size in ((lambda: len(kept) > limits.max_kept, lambda k: 1),
                           (lambda: sum(k.nbytes for k in kept.values()) > limits.max_kept_bytes, lambda k: k.nbytes)):
            while kept and over():
                held: dict[str, int] = {}
                for k in kept.values():
                    held[k.peer] = held.get(k.peer, 0) + size(k)
                biggest = max(held, key=held.__getitem__)  # ties: the first to keep a graph among them
                del kept[next(kid for kid, k in kept.items() if k.peer == biggest)]  # its oldest

    def _backward_run(self, job: BackwardJob) -> tuple[dict[str, Any], list[torch.Tensor]]:
        graph = self._kept_graph(job.kept, job.hidden, job.mask, job.blocks, job.prompts, job.adapter, job.lora)
        grad, grad_prompts, grad_lora = self.span.backward(job.hidden, job.grad_output, job.mask, job.blocks,
                                                           job.prompts, graph, job.tasks, job.lora)
        dtype, cpu = job.hidden.dtype, job.hidden.device  # replies leave from where requests came (the CPU)
        lora = {} if job.lora is None else job.lora.tensors()
        return BackwardReply(grad.to(cpu, dtype),
                             None if grad_prompts is None else grad_prompts.to(cpu, job.prompts.dtype),
                             {name: g.to(cpu, lora[name].dtype) for name, g in grad_lora.items()}).to_wire()

    def _kept_graph(self, kid: str | None, hidden: torch.Tensor, mask: torch.Tensor | None, blocks: tuple[int, int],
                    prompts: torch.Tensor | None, adapter: str | None = None, lora: LoraWeights | None = None
                    ) -> Graph | None:
        """The kept graph of the forward `kid`, if it is still here and ran on exactly these inputs."""
        if kid is None:
            return None
        with self._lock:
            kept = self._kept.pop(kid, None)
        if kept is None:
            return None  # expired or dropped: run the forward again
        graph = kept.graph
        given = {} if lora is None else lora.tensors()
        same = (kept.blocks == blocks and kept.adapter == adapter and _same(graph.inputs, hidden)
                and _same(kept.mask, mask) and _same(graph.prompts, prompts) and graph.lora.keys() == given.keys()
                and all(_same(graph.lora[n], given[n]) for n in given))
        return graph if same else None


@dataclass
class _Kept:
    graph: Graph
    mask: torch.Tensor | None
    blocks: tuple[int, int]
    deadline: float
    adapter: str | None = None
    nbytes: int = 0  # of the tensors it saved for the backward
    peer: str = ""  # whose forward kept it (Request.peer)


def _finite(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    try:
        require_finite(name, tensor, dtype)
    except ProtocolError as e:
        raise Refused("bad_request", str(e)) from None


def _same(kept: torch.Tensor | None, given: torch.Tensor | None) -> bool:
    """Whether a kept tensor holds exactly the values given now (both absent counts as the same)."""
    if kept is None or given is None:
        return kept is None and given is None
    return kept.shape == given.shape and torch.equal(kept.detach(), given.to(kept.device, kept.dtype))


def _int(value: Any, name: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise Refused("bad_request", f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


__all__ = ["Handler", "HandlerLimits", "Refused", "ProtocolError"]
