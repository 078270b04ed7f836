"""The client's view of the servers, and running hidden states through a chain of them.

`RemoteSequential` knows the servers of its model (their records, from discovery), plans chains with
`routing`, and runs the model's blocks remotely: `forward` as a differentiable function (the backward
pass asks each server for the gradient w.r.t. its inputs, in reverse order), and `InferenceSession` for generation
with the attention cache kept on the servers. A session keeps every input it sent to each hop, so a lost server's
cache can be rebuilt by replay.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any

import torch

from ...transport.codec import PROTOCOL_VERSION
from ...transport.discovery import Discovery
from ...transport.errors import (
    ConfigError,
    PeerTimeout,
    PeerUnreachable,
    ProtocolError,
    RelayRefused,
    RelayStopped,
    ServerBusy,
    SwarmError,
    UnknownSession,
)
from ...transport.records import ServerRecord
from ...transport.rpc import RpcClient, RpcClientConfig
from ..server.relay import MAX_WAIT as MAX_RELAY_WAIT
from .config import ClientConfig
from .routing import Hop, MissingBlocks, SpanInfo, missing_ranges, plan_forward, plan_inference

log = logging.getLogger(__name__)


class RemoteSequential(torch.nn.Module):
    """Blocks [0, num_blocks) of a model, run by the servers that `discovery` knows of."""

    def __init__(self, num_blocks: int, hidden_size: int, discovery: Discovery,
                 model_filter: Callable[[ServerRecord], bool] = lambda record: True,
                 config: ClientConfig | None = None, owns_discovery: bool = True):
        super().__init__()
        self.num_blocks, self.hidden_size = num_blocks, hidden_size
        self.config = config or ClientConfig()
        self.discovery, self._model_filter, self._owns_discovery = discovery, model_filter, owns_discovery
        self._rpc = RpcClientConfig(timeout=self.config.request_timeout, connect_timeout=self.config.connect_timeout,
                                    link_delay=self.config.link_delay, link_bandwidth=self.config.link_bandwidth)
        self._clients: dict[str, RpcClient] = {}  # peer (or peer#channel) -> its connection
        self._clients_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="swarm-client")  # parallel requests
        self._warned: set[str] = set()
        self._bans: dict[str, tuple[float, int]] = {}  # peer endpoint -> (banned until, consecutive failures)
        self.rtt: dict[str, float] = {}  # peer endpoint -> measured round trip (seconds, moving average)
        self._stop_pings = threading.Event()
        self._pinger = threading.Thread(target=self._ping_loop, name="swarm-ping", daemon=True)
        # a model dropped without close() still stops its threads and sockets
        self._finalizer = weakref.finalize(self, _release, self._clients, discovery if owns_discovery else None,
                                           self._stop_pings, self._pool)

    def _client(self, peer: str, channel: str = "") -> RpcClient:
        """The connection to `peer`; a named `channel` is a second connection, for calls that may wait long."""
        key = f"{peer}#{channel}" if channel else peer
        with self._clients_lock:
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = RpcClient(peer, self._rpc)
            return client

    def ping_all(self, timeout: float = 1.0) -> None:
        """Measure the round trip to every known server (in parallel, bounded by `timeout`)."""
        peers = list({r.addresses[0] for r in self.servers()})
        if not peers:
            return

        def ping(peer: str) -> tuple[str, float]:
            started = time.perf_counter()
            try:
                self._client(peer).call("ping", timeout=timeout)
            except SwarmError:
                return peer, UNREACHABLE_RTT
            return peer, time.perf_counter() - started

        with ThreadPoolExecutor(max_workers=min(16, len(peers))) as pool:
            for peer, rtt in pool.map(ping, peers):
                old = self.rtt.get(peer)
                self.rtt[peer] = rtt if old is None or rtt >= UNREACHABLE_RTT else 0.7 * old + 0.3 * rtt

    def _ping_loop(self) -> None:
        while not self._stop_pings.wait(self.config.ping_period):
            try:
                self.ping_all()
            except Exception:  # the pinger must not die of one bad round
                log.debug("ping round failed", exc_info=True)

    def start_pinging(self) -> None:
        self.ping_all()
        if not self._pinger.is_alive() and not self._stop_pings.is_set():
            self._pinger.start()

    def servers(self) -> list[ServerRecord]:
        """Serving records of this model that this client can use."""
        usable = []
        now = time.monotonic()
        for record in self.discovery.records(self._model_filter):
            if record.state not in ("online", "joining") or self._bans.get(record.addresses[0], (0, 0))[0] > now:
                continue
            problem = self._check(record)
            if problem is None:
                usable.append(record)
            elif record.peer_id not in self._warned:
                self._warned.add(record.peer_id)
                log.warning("leaving out server %s: %s", record.addresses[0], problem)
        return usable

    def _check(self, record: ServerRecord) -> str | None:
        if record.protocol != PROTOCOL_VERSION:
            return f"speaks protocol {record.protocol}, this client {PROTOCOL_VERSION}"
        if record.num_blocks != self.num_blocks or record.hidden_size != self.hidden_size:
            return (f"serves a model with {record.num_blocks} blocks of hidden size {record.hidden_size}, this one "
                    f"has {self.num_blocks} blocks of hidden size {self.hidden_size}")
        return None

    def covered(self) -> bool:
        return not missing_ranges([_span(r) for r in self.servers()], 0, self.num_blocks)

    def wait_ready(self, timeout: float) -> bool:
        """Wait (bounded) until the known servers cover every block; when servers are found but some blocks have
        none after a first gossip round, say which at once."""
        deadline = time.monotonic() + timeout
        if self.discovery.wait(lambda _: self.covered(), min(timeout, FIRST_LOOK)):
            return True
        left = deadline - time.monotonic()
        servers = self.servers()
        if servers and left > 0:
            log.warning("%s yet", _missing_text(self.spans(), 0, self.num_blocks))
        return self.discovery.wait(lambda _: self.covered(), max(0.0, left))

    def spans(self) -> list[SpanInfo]:
        """A snapshot of the usable servers, as routing sees them."""
        return [_span(r, self.rtt.get(r.addresses[0])) for r in self.servers()]

    def plan(self, start: int = 0, end: int | None = None, kind: str = "inference", cache_needed: int = 0
             ) -> list[Hop]:
        """A chain for blocks [start, end): the fastest for inference, a throughput-weighted draw for forward."""
        end = self.num_blocks if end is None else end
        if kind == "forward":
            return plan_forward(self.spans(), start, end)
        return plan_inference(self.spans(), start, end, cache_needed)

    def ban(self, peer: str, error: BaseException) -> None:
        """Avoid a failing server for a while (capped exponential backoff over consecutive failures)."""
        _, failures = self._bans.get(peer, (0.0, 0))
        delay = min(self.config.max_ban_time, self.config.ban_time * 2 ** min(failures, 30))
        self._bans[peer] = (time.monotonic() + delay, failures + 1)
        log.warning("server %s failed (%s); avoiding it for %.0f s", peer, error, delay)

    def ban_failed(self, error: BaseException) -> None:
        peer = getattr(error, "peer", None)
        if peer:
            self.ban(peer, error)

    def plan_or_wait(self, start: int, end: int, kind: str = "inference", cache_needed: int = 0) -> list[Hop]:
        """A chain for [start, end); when some blocks have no live server, wait (bounded) for one to appear."""
        deadline = time.monotonic() + self.config.wait_for_blocks
        announced = False
        while True:
            try:
                return self.plan(start, end, kind, cache_needed)
            except MissingBlocks as e:
                if time.monotonic() >= deadline:
                    raise MissingBlocks(e.missing, [(r.start, r.end) for r in self.servers()],
                                        waited=self.config.wait_for_blocks) from None
                if not announced:  # at once, so a user knows what the wait is for (Ctrl-C ends it)
                    announced = True
                    log.warning("%s; waiting up to %.0f s for one to join", _missing_text(self.spans(), start, end),
                                max(0.0, deadline - time.monotonic()))
                # short polls (time.sleep inside), so an interrupt ends the wait at once
                self.discovery.wait(lambda _: not missing_ranges([_span(r) for r in self.servers()], start, end),
                                    min(1.0, max(0.0, deadline - time.monotonic())))

    def retry(self, attempt: Callable[[], Any], what: str) -> Any:
        """Run `attempt` until it succeeds; each failure of a server bans it and tries again (bounded)."""
        for _ in range(self.config.max_retries):
            try:
                return attempt()
            except RECOVERABLE as e:
                self.ban_failed(e)
        raise SwarmError(f"{what} failed on {self.config.max_retries} routes in a row; giving up")

    def call(self, hop: Hop, msg_type: str, fields: dict[str, Any], tensors: list[torch.Tensor],
             timeout: float | None = None, channel: str = "") -> Any:
        try:
            reply = self._client(hop.peer, channel).call(msg_type, fields, tensors, timeout=timeout)
        except RECOVERABLE as e:
            raise _HopFailed(hop, e) from e
        if hop.peer in self._bans:
            self._bans[hop.peer] = (0.0, 0)  # it answers again: forget its failures
        return reply

    def submit(self, hop: Hop, msg_type: str, fields: dict[str, Any], tensors: list[torch.Tensor],
               timeout: float | None = None, channel: str = "") -> Future:
        """`call` on a background thread; the future holds the reply or the error."""
        return self._pool.submit(self.call, hop, msg_type, fields, tensors, timeout, channel)

    def _rows(self, hidden: torch.Tensor) -> list[slice]:
        """Row ranges of a batch small enough for one request (`ClientConfig.max_request_tokens`)."""
        batch, length = hidden.shape[:2]
        limit = self.config.max_request_tokens
        if length > limit:
            raise ConfigError(f"a sequence of {length} tokens is longer than one request may hold ({limit} tokens, "
                              "ClientConfig.max_request_tokens); use shorter inputs")
        per = max(1, limit // length)
        return [slice(i, min(i + per, batch)) for i in range(0, batch, per)]

    def hop_forward(self, hop: Hop, hidden: torch.Tensor, mask: torch.Tensor | None,
                    prompts: torch.Tensor | None = None, kept: list[str | None] | None = None) -> torch.Tensor:
        """Blocks of `hop` over `hidden` (split by rows into requests the server accepts). With a `kept` list, the
        server keeps each request's graph for the backward and the list gets their ids."""
        outs = []
        for rows in self._rows(hidden):
            names, tensors = _named(hidden=hidden[rows], attention_mask=_sliced(mask, rows),
                                    prompts=_hop_prompts(prompts, hop, rows))
            fields: dict[str, Any] = {"blocks": [hop.start, hop.end], "names": names}
            if kept is not None:
                fields["keep"] = True
            reply = self.call(hop, "forward", fields, tensors)
            outs.append(_one_tensor(reply, hidden[rows]))
            if kept is not None:
                kid = reply.get("kept")
                kept.append(kid if isinstance(kid, str) else None)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def hop_backward(self, hop: Hop, hidden: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor | None,
                     prompts: torch.Tensor | None = None, kept: list[str | None] | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients w.r.t. the input of `hop`'s blocks and w.r.t. their prompts (`prompts[hop.start:hop.end]`);
        `kept` are the ids of the forward's kept graphs (the server runs the blocks again without them)."""
        grads, grad_prompts = [], []
        for n, rows in enumerate(self._rows(hidden)):
            hop_prompts = _hop_prompts(prompts, hop, rows)
            names, tensors = _named(hidden=hidden[rows], grad_output=grad[rows], attention_mask=_sliced(mask, rows),
                                    prompts=hop_prompts)
            fields: dict[str, Any] = {"blocks": [hop.start, hop.end], "names": names}
            if kept is not None and n < len(kept) and kept[n] is not None:
                fields["kept"] = kept[n]
            reply = self.call(hop, "backward", fields, tensors)
            if hop_prompts is None:
                grads.append(_one_tensor(reply, hidden[rows]))
                continue
            named = dict(zip(reply.get("names", []), reply.tensors, strict=False))
            if set(named) != {"grad_input", "grad_prompts"} or named["grad_input"].shape != hidden[rows].shape \
                    or named["grad_prompts"].shape != hop_prompts.shape:
                raise SwarmError(f"{hop.peer} answered a backward pass with prompts with tensors "
                                 f"{[list(t.shape) for t in reply.tensors]}")
            grads.append(named["grad_input"].to(hidden.dtype))
            grad_prompts.append(named["grad_prompts"].to(prompts.dtype))
        grad_input = grads[0] if len(grads) == 1 else torch.cat(grads)
        if not grad_prompts:
            return grad_input, None
        if prompts.shape[1] == 1:  # one prompt for the whole batch: its gradient sums over the rows
            return grad_input, torch.stack(grad_prompts).sum(0)
        return grad_input, torch.cat(grad_prompts, dim=1)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                prompts: torch.Tensor | None = None) -> torch.Tensor:
        """The blocks over `hidden`, differentiable w.r.t. `hidden` and the deep `prompts` [blocks, batch or 1,
        prompt_length, hidden] (one per block, added at the first positions before it)."""
        mask = None if attention_mask is None else attention_mask.to(torch.int8)
        if prompts is not None and (prompts.dim() != 4 or prompts.shape[0] != self.num_blocks
                                    or prompts.shape[1] not in (1, hidden.shape[0])
                                    or prompts.shape[3] != hidden.shape[2]):
            raise ConfigError(f"prompts must be [{self.num_blocks}, 1 or batch, prompt_length, {hidden.shape[2]}], "
                              f"got {list(prompts.shape)}")
        keep = torch.is_grad_enabled() and (hidden.requires_grad or (prompts is not None and prompts.requires_grad))
        return _RemoteBlocks.apply(hidden, mask, prompts, keep, self)

    def inference_session(self, max_length: int, batch_size: int | None = None) -> InferenceSession:
        return InferenceSession(self, max_length, batch_size)

    def close(self) -> None:
        self._finalizer()


def _release(clients: dict[str, RpcClient], discovery: Discovery | None, stop_pings: threading.Event,
             pool: ThreadPoolExecutor) -> None:
    stop_pings.set()
    pool.shutdown(wait=False, cancel_futures=True)
    for client in clients.values():
        client.close()
    clients.clear()
    if discovery is not None:
        discovery.stop()


FIRST_LOOK = 1.0  # seconds of discovery before blocks without a server are reported while joining


def _missing_text(spans: list[SpanInfo], start: int, end: int) -> str:
    """'no server covers blocks 2:4 of the model (live servers cover 0:2)', for warnings."""
    gaps = ", ".join(f"{a}:{b}" for a, b in missing_ranges(spans, start, end))
    served = ", ".join(f"{a}:{b}" for a, b in sorted({(s.start, s.end) for s in spans})) or "nothing"
    return f"no server covers blocks {gaps} of the model (live servers cover {served})"


def _span(record: ServerRecord, rtt: float | None = None) -> SpanInfo:
    return SpanInfo(record.addresses[0], record.start, record.end, rtt=rtt, throughput=record.throughput,
                    cache_free=record.cache_tokens_free)


def _named(**tensors: torch.Tensor | None) -> tuple[list[str], list[torch.Tensor]]:
    present = [(k, v) for k, v in tensors.items() if v is not None]
    return [k for k, _ in present], [v for _, v in present]


def _sliced(tensor: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if tensor is None else tensor[rows]


def _hop_prompts(prompts: torch.Tensor | None, hop: Hop, rows: slice | None = None) -> torch.Tensor | None:
    """The prompts of `hop`'s blocks (for `rows` of the batch, unless one prompt serves every row)."""
    if prompts is None:
        return None
    prompts = prompts[hop.start:hop.end]
    return prompts if rows is None or prompts.shape[1] == 1 else prompts[:, rows]


def _one_tensor(reply: Any, like: torch.Tensor) -> torch.Tensor:
    if len(reply.tensors) != 1 or reply.tensors[0].shape != like.shape:
        raise SwarmError(f"a server answered with tensors {[list(t.shape) for t in reply.tensors]}, "
                         f"expected one of shape {list(like.shape)}")
    return reply.tensors[0].to(like.dtype)


class _RelayStopped(SwarmError):
    """A relayed step stopped at hop `index` (whose input is `hidden`): `error` says why."""

    def __init__(self, index: int, hidden: torch.Tensor, error: SwarmError):
        super().__init__(str(error))
        self.index, self.hidden, self.error = index, hidden, error


class _HopFailed(SwarmError):
    """A server of a hop failed in a way another server can make up for."""

    def __init__(self, hop: Hop, error: SwarmError):
        super().__init__(f"{hop.peer} (blocks {hop.start}:{hop.end}): {error}")
        self.hop, self.error, self.peer = hop, error, hop.peer


UNREACHABLE_RTT = 1.0  # seconds counted for a server whose ping failed
RELAY_ATTEMPTS = 3  # relayed steps in a row that may fail before a session stops trying to relay

# failures another server can make up for: the server is gone, stuck, restarted, draining, or broken
# (a full cache is not one of them yet: the caller learns it at once instead of waiting for a server with room)
RECOVERABLE = (_HopFailed, PeerTimeout, PeerUnreachable, UnknownSession, ServerBusy, ProtocolError)


Inputs = list[tuple[Hop, torch.Tensor, "list[str | None] | None"]]  # per hop: its input and its kept graphs


def _forward_span(seq: RemoteSequential, start: int, end: int, hidden: torch.Tensor, mask: torch.Tensor | None,
                  prompts: torch.Tensor | None, keep: bool = False) -> tuple[torch.Tensor, Inputs]:
    """Run blocks [start, end) forward, retrying failed hops elsewhere; returns the output and each hop's input (and,
    with `keep`, the ids of the graphs its server keeps for the backward)."""
    def attempt() -> tuple[torch.Tensor, Inputs]:
        out, inputs = hidden, []
        for hop in seq.plan_or_wait(start, end, kind="forward"):
            kept: list[str | None] | None = [] if keep else None
            inputs.append((hop, out, kept))
            out = seq.hop_forward(hop, out, mask, prompts, kept)
        return out, inputs

    return seq.retry(attempt, f"forward through blocks {start}:{end}")


class _RemoteBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, mask: torch.Tensor | None, prompts: torch.Tensor | None, keep: bool,
                seq: RemoteSequential) -> torch.Tensor:
        prompts = None if prompts is None else prompts.detach()
        out, inputs = _forward_span(seq, 0, seq.num_blocks, hidden.detach(), mask, prompts, keep)
        ctx.seq, ctx.inputs, ctx.mask, ctx.prompts = seq, inputs, mask, prompts
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor | None, None, None]:
        grad = grad.contiguous()
        seq, mask, prompts = ctx.seq, ctx.mask, ctx.prompts
        grad_prompts = None if prompts is None else torch.zeros_like(prompts)
        for hop, hidden, kept in reversed(ctx.inputs):
            grad, hop_grad = _backward_span(seq, hop, hidden, grad, mask, prompts, kept)
            if grad_prompts is not None and hop_grad is not None:
                grad_prompts[hop.start:hop.end] = hop_grad
        return grad, None, grad_prompts, None, None


def _backward_span(seq: RemoteSequential, hop: Hop, hidden: torch.Tensor, grad: torch.Tensor,
                   mask: torch.Tensor | None, prompts: torch.Tensor | None, kept: list[str | None] | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients w.r.t. the input of `hop`'s blocks and their prompts; when its server fails, recompute the blocks on
    others and retry."""
    try:
        return seq.hop_backward(hop, hidden, grad, mask, prompts, kept)
    except RECOVERABLE as e:
        seq.ban_failed(e)

    def attempt() -> tuple[torch.Tensor, torch.Tensor | None]:
        _, inputs = _forward_span(seq, hop.start, hop.end, hidden, mask, prompts)  # inputs of the replacement hops
        g, g_prompts = grad, None if prompts is None else torch.zeros_like(prompts[hop.start:hop.end])
        for sub_hop, sub_hidden, _ in reversed(inputs):
            g, sub_grad = seq.hop_backward(sub_hop, sub_hidden, g, mask, prompts)
            if g_prompts is not None and sub_grad is not None:
                g_prompts[sub_hop.start - hop.start:sub_hop.end - hop.start] = sub_grad
        return g, g_prompts

    return seq.retry(attempt, f"backward through blocks {hop.start}:{hop.end}")


@dataclass
class _HopSession:
    hop: Hop
    session_id: str | None = None
    # what was sent, in order: (hidden, attention mask, this hop's deep prompts)
    history: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = field(default_factory=list)


class InferenceSession:
    """Generation state on the servers: each step sends only the new tokens' hidden states through the chain.

    Every hop keeps the inputs it was sent. When a server fails (it vanished, timed out, lost the session, or is
    shutting down), it is banned for a while, a replacement chain is found for its blocks only (waiting, bounded,
    when none exists yet), the hop's history is replayed there step by step, exactly as it was first sent, so the
    rebuilt cache is the same, and the step goes on. Sampling is untouched by recovery, so the tokens are the same.
    """

    def __init__(self, seq: RemoteSequential, max_length: int, batch_size: int | None = None):
        if not isinstance(max_length, int) or max_length < 1:
            raise ConfigError(f"max_length must be a positive integer, got {max_length!r}")
        self.seq, self.max_length, self.batch_size = seq, max_length, batch_size
        self.position = 0  # tokens the servers hold
        self.hops: list[_HopSession] = []
        self.closed = False
        self.recoveries = 0  # replacement chains built so far
        self._no_relay = False  # set when relaying failed RELAY_ATTEMPTS steps in a row
        self._relay_failures = 0

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self.hops]

    def _open_chain(self, start: int, end: int) -> list[_HopSession]:
        chain = self.seq.plan_or_wait(start, end, "inference", (self.batch_size or 1) * self.max_length)
        opened: list[_HopSession] = []
        try:
            for hop in chain:
                reply = self.seq.call(hop, "open", {"batch_size": self.batch_size, "max_length": self.max_length,
                                                    "blocks": [hop.start, hop.end]}, [],
                                      timeout=self.seq.config.connect_timeout)
                opened.append(_HopSession(hop, str(reply.get("session"))))
        except BaseException:
            self._close_sessions(opened)
            raise
        return opened

    def _step_hop(self, hop_session: _HopSession, hidden: torch.Tensor, mask: torch.Tensor | None,
                  start: int | None = None, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """One step on one hop; `prompts` are that hop's deep prompts (first step only)."""
        names, tensors = _named(hidden=hidden, attention_mask=mask, prompts=prompts)
        fields: dict[str, Any] = {"session": hop_session.session_id, "names": names}
        if start is not None:  # the server rewinds to it first: a step half done by a broken relay runs again
            fields["start"] = start
        reply = self.seq.call(hop_session.hop, "step", fields, tensors)
        out = _one_tensor(reply, hidden)
        hop_session.history.append((hidden, mask, prompts))
        return out

    def _replacement(self, failed: _HopSession) -> list[_HopSession]:
        """New hops for the failed hop's blocks, with its history replayed into their caches."""
        def attempt() -> list[_HopSession]:
            hops = self._open_chain(failed.hop.start, failed.hop.end)
            try:
                for hidden, mask, prompts in failed.history:
                    for hop_session in hops:
                        hop = hop_session.hop
                        sub = None if prompts is None else \
                            prompts[hop.start - failed.hop.start:hop.end - failed.hop.start]
                        hidden = self._step_hop(hop_session, hidden, mask, prompts=sub)
            except BaseException:
                self._close_sessions(hops)
                raise
            return hops

        hops = self.seq.retry(attempt, f"recovering blocks {failed.hop.start}:{failed.hop.end}")
        self.recoveries += 1
        log.info("recovered blocks %d:%d on %s (replayed %d steps)", failed.hop.start, failed.hop.end,
                 ", ".join(h.hop.peer for h in hops), len(failed.history))
        return hops

    def step(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
             prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Run new tokens' hidden states [batch, new, hidden] through every hop; returns the last hop's output.

        `prompts` [blocks, batch or 1, prompt_length, hidden] are deep prompts, one per block, added at the first
        positions: only the first step of a session may carry them.
        """
        if self.closed:
            raise SwarmError("this inference session is closed")
        batch, new, _ = hidden.shape
        if self.batch_size is not None and self.hops and batch != self.batch_size:
            raise ConfigError(f"the session was opened for batch size {self.batch_size}, this step has {batch}")
        if prompts is not None and self.position != 0:
            raise ConfigError("deep prompts may only come with the first step of an inference session")
        if self.position + new > self.max_length:
            raise ConfigError(f"the session holds {self.position} tokens; {new} more would pass its max_length "
                              f"{self.max_length}: open it with a larger max_length")
        if not self.hops:
            self.batch_size = batch
            self.hops = self.seq.retry(lambda: self._open_chain(0, self.seq.num_blocks), "opening a session")
            log.info("inference session through %s",
                     " -> ".join(f"{h.peer} [{h.start}:{h.end})" for h in self.route))
        mask = None if attention_mask is None else attention_mask.to(torch.int8)
        out = hidden.detach()
        i, failures, hop_by_hop = 0, 0, not self.seq.config.relay or self._no_relay
        while i < len(self.hops):
            try:
                if not hop_by_hop and i + 1 < len(self.hops):
                    out, i = self._relayed(i, out, mask, prompts)
                    self._relay_failures = 0
                else:
                    out = self._step_hop(self.hops[i], out, mask, start=self.position,
                                         prompts=_hop_prompts(prompts, self.hops[i].hop))
                    i += 1
            except _RelayStopped as stopped:
                out, i, error = stopped.hidden, stopped.index, stopped.error
                if isinstance(error, (RelayStopped, RelayRefused)):
                    # e.g. a server does not know the next one (yet, or any more, when it just died): this step
                    # goes on hop by hop; after RELAY_ATTEMPTS such steps in a row, the whole session does
                    hop_by_hop, self._relay_failures = True, self._relay_failures + 1
                    self._no_relay = self._relay_failures >= RELAY_ATTEMPTS
                    log.warning("relay failed (%s); stepping hop by hop%s", error,
                                " from now on" if self._no_relay else " for this step")
                elif isinstance(error, RECOVERABLE):
                    failures = self._recover(i, error, failures)
                else:
                    raise error from None
            except RECOVERABLE as e:
                failures = self._recover(i, e, failures)
        self.position += new
        return out

    def _recover(self, i: int, error: BaseException, failures: int) -> int:
        """Replace hop `i` after its server failed; returns the updated failure count of this step."""
        failures += 1
        if failures > self.seq.config.max_retries:
            raise SwarmError(f"giving up after {failures - 1} recoveries in one step: {error}") from error
        hop_session = self.hops[i]
        self.seq.ban(hop_session.hop.peer, error)
        if not isinstance(getattr(error, "error", error), (PeerUnreachable, PeerTimeout)):
            self._close_sessions([hop_session])  # it still answers: free its cache now
        self.hops[i:i + 1] = self._replacement(hop_session)
        return failures

    def _relayed(self, i: int, hidden: torch.Tensor, mask: torch.Tensor | None, prompts: torch.Tensor | None,
                 ) -> tuple[torch.Tensor, int]:
        """One step from hop `i` to the end, servers passing it along; returns the output and the next hop index.

        Every server of the chain gets its request at once. The first gets the hidden states; each later one waits
        for its input, pushed by the server before it, and every server answers with its output, which is the next
        hop's history. On a failure at hop k, the requests still waiting are cancelled and the step goes on from k.
        """
        chain, ticket = self.hops[i:], secrets.token_hex(8)
        timeout = self.seq.config.request_timeout
        hop_prompts = [_hop_prompts(prompts, hop_session.hop) for hop_session in chain]
        pending: list[Future] = []  # the requests of hops 1.. (hop 0's is sent from here, after them)
        for k, hop_session in enumerate(chain):
            fields: dict[str, Any] = {"session": hop_session.session_id, "start": self.position}
            if k + 1 < len(chain):
                after = chain[k + 1]
                fields["push"] = {"peer": after.hop.peer, "session": after.session_id, "ticket": f"{ticket}.{k + 1}"}
            if k == 0:
                names, first = _named(hidden=hidden, attention_mask=mask, prompts=hop_prompts[0])
                first_fields = {**fields, "names": names}
                continue
            # it waits for the servers before it, each bounded by the request timeout
            wait = min(MAX_RELAY_WAIT, timeout * k)
            names, tensors = _named(attention_mask=mask, prompts=hop_prompts[k])
            fields.update(ticket=f"{ticket}.{k}", wait=wait, names=names)
            pending.append(self.seq.submit(hop_session.hop, "step", fields, tensors, timeout + wait, channel="relay"))
        x = hidden
        for k, hop_session in enumerate(chain):
            try:
                reply = self.seq.call(hop_session.hop, "step", first_fields, first) if k == 0 \
                    else pending[k - 1].result()
                out = _one_tensor(reply, hidden)
            except BaseException as e:
                self._cancel(chain[k + 1:], pending[k:], ticket, k + 1)
                if not isinstance(e, SwarmError):
                    raise
                raise _RelayStopped(i + k, x, e) from e
            hop_session.history.append((x, mask, hop_prompts[k]))
            x = out
        return x, len(self.hops)

    def _cancel(self, waiting: list[_HopSession], pending: list[Future], ticket: str, first: int) -> None:
        """Cancel the relayed requests that wait for an input that will not come, and let their calls end."""
        for k, (hop_session, future) in enumerate(zip(waiting, pending, strict=True), start=first):
            if future.done():
                continue
            try:
                self.seq.call(hop_session.hop, "cancel", {"session": hop_session.session_id,
                                                          "ticket": f"{ticket}.{k}"}, [],
                              timeout=self.seq.config.connect_timeout)
            except SwarmError as e:  # gone too: its own call ends with that
                log.debug("cancelling a relayed step on %s failed: %s", hop_session.hop.peer, e)
        wait_futures(pending, timeout=self.seq.config.request_timeout)

    def rewind(self, position: int) -> None:
        """Forget the tokens after the first `position`, which must be where a step began: the next step goes on
        from there (every step tells the servers its start position, and they drop what their caches hold beyond
        it). Used to drop an interrupted or unwanted continuation, e.g. a chat answer stopped with Ctrl-C."""
        if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position <= self.position:
            raise ConfigError(f"can only rewind to a position in [0, {self.position}], got {position!r}")
        keep = []
        for hop_session in self.hops:
            count, total = 0, 0
            for hidden, _, _ in hop_session.history:
                if total >= position:
                    break
                total, count = total + hidden.shape[1], count + 1
            if total != position:
                raise ConfigError(f"cannot rewind to {position}: no step of this session began there")
            keep.append(count)
        for hop_session, count in zip(self.hops, keep, strict=True):
            del hop_session.history[count:]  # a step half done when interrupted goes too
        self.position = position

    def _close_sessions(self, hops: list[_HopSession]) -> None:
        for hop_session in hops:
            if hop_session.session_id is None:
                continue
            try:
                self.seq.call(hop_session.hop, "close", {"session": hop_session.session_id}, [], timeout=1.0)
            except SwarmError as e:  # the server may be gone; its session expires on its own
                log.debug("closing a session on %s failed: %s", hop_session.hop.peer, e)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._close_sessions(self.hops)

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
