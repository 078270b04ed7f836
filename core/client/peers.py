"""The client's view of the servers: connections, round trips, bans and the chains routing plans over them.

`Peers` knows the servers of one model (their records, from discovery) and keeps what the client learns of them:
- one connection per server (and a second, named channel for calls that may wait long, such as relayed steps);
- measured round trips (`ping_all`, and a background pinger), as a moving average;
- bans: a server that failed is avoided for a while, with capped exponential backoff over consecutive failures,
  forgiven when it answers again; a server caught answering wrong outputs (verify.py) is `distrust`ed: avoided for
  `ClientConfig.verify_ban_time` (a day by default), by address and by the peer ids of its records, and never
  forgiven by answering;
- the usable-server snapshot (`servers`, `spans`: only servers whose weight quantization `ClientConfig.server_quant`
  allows, when it is set) that the pure planners of routing.py turn into chains (`plan`,
  `plan_or_wait`, which waits, bounded, for blocks no live server covers);
- requests: `send` one wire message (types of transport/messages.py) to a hop, `submit` it on a background thread, and
  `retry` an attempt on other routes while servers fail. Hidden states and gradients travel compressed both ways
  with `codec_for` the server (`ClientConfig.compression`, among the codecs its record announces: transport/packing.py);
  every reply's compressed tensors are decoded before anyone reads it, and a malformed one fails the hop.
- owners: a signed record is used only once its address has answered `info` with the record's peer id and run one
  timed step of one token through its first block (both asked in the background the first time the record is seen),
  so a record cannot send clients to someone else's server, nor to one that does not answer steps, and the
  throughput it announces is bounded by what that step measured.
Ban, owner and round-trip state is touched by the pinger, request threads and the caller: one lock guards it.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from ...quant.codecs import choose
from ...quant.compression import WireCodecs
from ...transport.codec import PROTOCOL_VERSION, Message
from ...transport.discovery import Discovery
from ...transport.errors import (
    AccessDenied,
    CacheFull,
    PeerTimeout,
    PeerUnreachable,
    ProtocolError,
    ServerBusy,
    SwarmError,
    UnknownAdapter,
    UnknownSession,
    WrongBlocks,
)
from ...transport.messages import Backward, Close, Forward, Info, Open, Ping, RequestMessage, Step
from ...transport.packing import COMPRESS, announced, pack, unpack
from ...transport.records import ServerRecord
from ...transport.rpc import CurveClient, RpcClient, RpcClientConfig
from .config import ClientConfig
from .routing import Hop, MissingAdapter, MissingBlocks, SpanInfo, missing_ranges, plan_forward, plan_inference

log = logging.getLogger(__name__)

FIRST_LOOK = 1.0  # seconds of discovery before blocks without a server are reported while joining
UNREACHABLE_RTT = 1.0  # seconds counted for a server whose ping failed
OWNER_RECHECK = 5.0  # seconds before an address that did not answer as a record's owner is asked again
# an announced throughput (tokens/s through a span, measured by the server on 32-token forwards) may be at most this
# many times what one measured one-token step through one block, times the span's blocks, allows
PROBE_SLACK = 64.0


class HopFailed(SwarmError):
    """A server of a hop failed in a way another server can make up for."""

    def __init__(self, hop: Hop, error: SwarmError):
        super().__init__(f"{hop.peer} (blocks {hop.start}:{hop.end}): {error}")
        self.hop, self.error, self.peer = hop, error, hop.peer


# failures another server can make up for: the server is gone, stuck, restarted, draining, broken, or does not hold
# the blocks its record claims, or the adapter it announced (a full cache is not one of them yet: the caller learns it
# at once instead of waiting for a server with room)
RECOVERABLE = (HopFailed, PeerTimeout, PeerUnreachable, UnknownSession, ServerBusy, WrongBlocks, ProtocolError,
               UnknownAdapter, AccessDenied)

_Reply = TypeVar("_Reply")
COMPRESSED = (Forward.TYPE, Backward.TYPE, Step.TYPE)  # requests whose tensors (and replies') may travel compressed


class Peers:
    """The servers of a model with `num_blocks` blocks of `hidden_size` that `discovery` knows of."""

    def __init__(self, num_blocks: int, hidden_size: int, discovery: Discovery,
                 model_filter: Callable[[ServerRecord], bool] = lambda record: True,
                 config: ClientConfig | None = None, owns_discovery: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self.num_blocks, self.hidden_size = num_blocks, hidden_size
        self.config = config or ClientConfig()
        self.discovery, self._model_filter, self._owns_discovery = discovery, model_filter, owns_discovery
        key = self.config.swarm_key
        self._rpc = RpcClientConfig(timeout=self.config.request_timeout, connect_timeout=self.config.connect_timeout,
                                    link_delay=self.config.link_delay, link_bandwidth=self.config.link_bandwidth,
                                    curve=None if key is None else CurveClient.of(key))
        self._clients: dict[str, RpcClient] = {}  # peer (or peer#channel) -> its connection
        self._clients_lock = threading.Lock()
        self.codecs = WireCodecs()  # what this client encodes and decodes (quant/compression.py)
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="swarm-client")  # parallel requests
        self._clock = clock  # what bans are timed with
        self._lock = threading.Lock()  # guards the state below
        self._warned: set[str] = set()  # peer ids already warned about
        self._bans: dict[str, tuple[float, int]] = {}  # peer endpoint -> (banned until, consecutive failures)
        self._distrusted: dict[str, float] = {}  # endpoint or peer id of a server caught lying -> avoided until
        self._rtt: dict[str, float] = {}  # peer endpoint -> measured round trip (seconds, moving average)
        self._owners: dict[str, tuple[str | None, float]] = {}  # endpoint -> (peer id it answered with, when)
        self._checking: set[str] = set()  # endpoints whose owner is being asked
        self._step_times: dict[str, float] = {}  # endpoint -> seconds of a one-token step through one block
        self._stop_pings = threading.Event()
        self._pinger = threading.Thread(target=self._ping_loop, name="swarm-ping", daemon=True)
        # dropped without close(), the peers still stop their threads and sockets
        self._finalizer = weakref.finalize(self, _release, self._clients, discovery if owns_discovery else None,
                                           self._stop_pings, self._pool)

    # --- connections and round trips -------------------------------------------------------------------------------

    def _client(self, peer: str, channel: str = "") -> RpcClient:
        """The connection to `peer`; a named `channel` is a second connection, for calls that may wait long."""
        key = f"{peer}#{channel}" if channel else peer
        with self._clients_lock:
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = RpcClient(peer, self._rpc)
            return client

    def rtt(self, peer: str) -> float | None:
        """The measured round trip to `peer` in seconds (None: not measured yet)."""
        with self._lock:
            return self._rtt.get(peer)

    def ping_all(self, timeout: float = 1.0) -> None:
        """Measure the round trip to every known server (in parallel, bounded by `timeout`)."""
        peers = list({r.addresses[0] for r in self.servers()})
        if not peers:
            return

        def ping(peer: str) -> tuple[str, float]:
            started = time.perf_counter()
            try:
                self._client(peer).call(*Ping().to_wire(), timeout=timeout)
            except SwarmError:
                return peer, UNREACHABLE_RTT
            return peer, time.perf_counter() - started

        with ThreadPoolExecutor(max_workers=min(16, len(peers))) as pool:
            measured = list(pool.map(ping, peers))
        with self._lock:
            for peer, rtt in measured:
                old = self._rtt.get(peer)
                self._rtt[peer] = rtt if old is None or rtt >= UNREACHABLE_RTT else 0.7 * old + 0.3 * rtt

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

    # --- bans ------------------------------------------------------------------------------------------------------

    def ban(self, peer: str, error: BaseException) -> None:
        """Avoid a failing server for a while (capped exponential backoff over consecutive failures)."""
        with self._lock:
            _, failures = self._bans.get(peer, (0.0, 0))
            delay = min(self.config.max_ban_time, self.config.ban_time * 2 ** min(failures, 30))
            self._bans[peer] = (self._clock() + delay, failures + 1)
        log.warning("server %s failed (%s); avoiding it for %.0f s", peer, error, delay)

    def ban_failed(self, error: BaseException) -> None:
        """Ban the server an error came from, when it says which."""
        peer = getattr(error, "peer", None)
        if peer:
            self.ban(peer, error)

    def banned(self, peer: str) -> bool:
        """Whether `peer` is avoided now."""
        with self._lock:
            now = self._clock()
            return self._bans.get(peer, (0.0, 0))[0] > now or self._distrusted.get(peer, 0.0) > now

    def distrust(self, peer: str, reason: str) -> None:
        """Avoid a server whose outputs were found wrong, for `verify_ban_time` (answering again does not end it):
        its address, and the peer ids of its signed records (so the same server is not used at another address;
        an unsigned record's id could be anyone's, so banning it could frame another server)."""
        until = self._clock() + self.config.verify_ban_time
        ids = {r.peer_id for r in self.discovery.records(self._model_filter) if peer in r.addresses and r.signed}
        with self._lock:
            for key in (peer, *ids):
                self._distrusted[key] = max(until, self._distrusted.get(key, 0.0))
        log.warning("server %s%s answered wrong outputs (%s); avoiding it for %.0f s", peer,
                    f" (peer id {', '.join(sorted(i[:16] for i in ids))})" if ids else "", reason,
                    self.config.verify_ban_time)

    def distrusted(self, peer: str) -> bool:
        """Whether `peer` (an endpoint or a peer id) was found answering wrong outputs and is still avoided."""
        with self._lock:
            return self._distrusted.get(peer, 0.0) > self._clock()

    def failures(self, peer: str) -> int:
        """Consecutive failures of `peer` since it last answered (what its next ban's length grows with)."""
        with self._lock:
            return self._bans.get(peer, (0.0, 0))[1]

    def _forgive(self, peer: str) -> None:
        with self._lock:
            if peer in self._bans:
                self._bans[peer] = (0.0, 0)  # it answers again: forget its failures

    # --- the usable servers and the chains over them ---------------------------------------------------------------

    def servers(self, adapter: str | None = None) -> list[ServerRecord]:
        """Serving records of this model that this client can use (not banned, same protocol and shape, of a weight
        quantization `server_quant` allows; holding or able to load `adapter`, when one is asked for)."""
        now = self._clock()
        with self._lock:
            banned = {peer for peer, (until, _) in self._bans.items() if until > now}
            banned.update(peer for peer, until in self._distrusted.items() if until > now)
        usable = []
        allowed = self.config.server_quant
        for record in self.discovery.records(self._model_filter):
            if record.state != "online" or record.addresses[0] in banned or record.peer_id in banned:
                continue
            if adapter is not None and adapter not in record.adapters:
                continue
            if allowed is not None and record.quant not in allowed:
                continue
            problem = self._check(record)
            if problem is None:
                if self._owned(record):
                    usable.append(record)
                continue
            with self._lock:
                warn = record.peer_id not in self._warned
                self._warned.add(record.peer_id)
            if warn:
                log.warning("leaving out server %s: %s", record.addresses[0], problem)
        return usable

    def _owned(self, record: ServerRecord) -> bool:
        """Whether the server at a signed record's address has been seen to be that record's owner (it answered
        `info` with the record's peer id). A record signed by one server can name another's address; until the
        address has answered, the record is left out and the check starts in the background."""
        if not record.signed:
            return True  # an older server's record: nothing to check it against
        address = record.addresses[0]
        now = self._clock()
        with self._lock:
            owner, checked = self._owners.get(address, (None, -1e9))
            if owner == record.peer_id:
                return True
            if address in self._checking or now - checked < OWNER_RECHECK:
                return False
            self._checking.add(address)
        self._pool.submit(self._check_owner, address, record.peer_id, record.start)
        return False

    def _check_owner(self, address: str, peer_id: str, block: int) -> None:
        """Ask `address` who it is, then time one inference step of one token through its first block (what
        routing will ask of it); a server that does not answer either is left out for now."""
        answered, step_time = None, None
        try:
            reply = self._client(address).call(*Info().to_wire(), timeout=self.config.connect_timeout)
            answered = reply.fields.get("peer_id")
            if answered == peer_id:
                step_time = self._probe_step(address, block)
        except SwarmError as e:
            log.debug("checking the server at %s failed: %s", address, e)
            answered = None
        with self._lock:
            self._checking.discard(address)
            self._owners[address] = (answered if isinstance(answered, str) else None, self._clock())
            if step_time is not None:
                self._step_times[address] = step_time
            warn = answered != peer_id and address not in self._warned
            if warn:
                self._warned.add(address)
        if warn and answered is not None:
            log.warning("a record of %s names %s, where %s answers: leaving it out", peer_id[:16], address,
                        str(answered)[:16])

    def _probe_step(self, address: str, block: int) -> float | None:
        """Seconds of one step of one token through block `block` at `address` (None: it had no cache room, so
        nothing was measured); raises SwarmError when it does not answer in time."""
        client, timeout = self._client(address), self.config.connect_timeout
        try:
            opened = client.call(*Open(1, 1, blocks=(block, block + 1)).to_wire(), timeout=timeout)
        except CacheFull:
            return None
        session = opened.fields.get("session")
        if not isinstance(session, str):
            raise ProtocolError(f"{address} answered an open without a session id")
        try:
            started = time.perf_counter()
            client.call(*Step(session, torch.zeros(1, 1, self.hidden_size)).to_wire(), timeout=timeout)
            return time.perf_counter() - started
        finally:
            try:
                client.call(*Close(session).to_wire(), timeout=timeout)
            except SwarmError as e:
                log.debug("closing a probe session at %s failed: %s", address, e)

    def _check(self, record: ServerRecord) -> str | None:
        if record.protocol != PROTOCOL_VERSION:
            return f"speaks protocol {record.protocol}, this client {PROTOCOL_VERSION}"
        if record.num_blocks != self.num_blocks or record.hidden_size != self.hidden_size:
            return (f"serves a model with {record.num_blocks} blocks of hidden size {record.hidden_size}, this one "
                    f"has {self.num_blocks} blocks of hidden size {self.hidden_size}")
        return None

    # --- compression on the wire ----------------------------------------------------------------------------------

    def _record_of(self, peer: str) -> ServerRecord | None:
        return next((r for r in self.discovery.records(self._model_filter) if r.addresses[0] == peer), None)

    def codec_for(self, peer: str) -> str:
        """The codec of the hidden states and gradients sent to `peer` and asked of it (`ClientConfig.compression`,
        when the peer announced it; "none" for a peer that announced no compression or that no record describes)."""
        setting = self.config.compression
        record = None if setting == "none" else self._record_of(peer)
        if record is None:
            return "none"
        return choose(setting, record.dtype, announced(record.capabilities))

    def push_codec(self, sender: str, receiver: str) -> str | None:
        """The codec `sender` pushes a relayed step's output to `receiver` in: `receiver`'s codec when `sender`
        announced it too (None: plain)."""
        codec = self.codec_for(receiver)
        record = None if codec == "none" else self._record_of(sender)
        if record is None or codec not in announced(record.capabilities):
            return None
        return codec

    def covered(self, adapter: str | None = None) -> bool:
        return not missing_ranges([_span(r) for r in self.servers(adapter)], 0, self.num_blocks)

    def wait_ready(self, timeout: float, adapter: str | None = None) -> bool:
        """Wait (bounded) until the known servers cover every block (with `adapter`, when one is asked for); when
        servers are found but some blocks have none after a first gossip round, say which at once."""
        deadline = time.monotonic() + timeout
        if self.discovery.wait(lambda _: self.covered(adapter), min(timeout, FIRST_LOOK)):
            return True
        left = deadline - time.monotonic()
        servers = self.servers()
        if servers and left > 0:
            log.warning("%s yet", self._missing_text(0, self.num_blocks, adapter))
        return self.discovery.wait(lambda _: self.covered(adapter), max(0.0, left))

    def spans(self, adapter: str | None = None) -> list[SpanInfo]:
        """A snapshot of the usable servers (holding `adapter`, when one is asked for), as routing sees them."""
        servers = self.servers(adapter)
        with self._lock:
            rtt, steps = dict(self._rtt), dict(self._step_times)
        return [_span(r, rtt.get(r.addresses[0]), steps.get(r.addresses[0])) for r in servers]

    def plan(self, start: int = 0, end: int | None = None, kind: str = "inference", cache_needed: int = 0,
             adapter: str | None = None) -> list[Hop]:
        """A chain for blocks [start, end): the fastest for inference, a throughput-weighted draw for forward; only
        through servers that hold (or can load) `adapter`, when one is asked for."""
        end = self.num_blocks if end is None else end
        try:
            if kind == "forward":
                return plan_forward(self.spans(adapter), start, end)
            return plan_inference(self.spans(adapter), start, end, cache_needed)
        except MissingBlocks as e:
            if adapter is None:
                raise
            raise MissingAdapter(adapter, e.missing, [(r.start, r.end) for r in self.servers(adapter)],
                                 [(r.start, r.end) for r in self.servers()]) from None

    def plan_or_wait(self, start: int, end: int, kind: str = "inference", cache_needed: int = 0,
                     adapter: str | None = None) -> list[Hop]:
        """A chain for [start, end); when some blocks have no live server (with `adapter`), wait (bounded) for one
        to appear."""
        deadline = time.monotonic() + self.config.wait_for_blocks
        announced = False
        while True:
            try:
                return self.plan(start, end, kind, cache_needed, adapter)
            except MissingBlocks as e:
                if time.monotonic() >= deadline:
                    if isinstance(e, MissingAdapter):
                        raise MissingAdapter(adapter, e.missing, e.holding, e.all_servers,
                                             waited=self.config.wait_for_blocks) from None
                    raise MissingBlocks(e.missing, [(r.start, r.end) for r in self.servers()],
                                        waited=self.config.wait_for_blocks, note=self.quant_note(start, end)) from None
                if not announced:  # at once, so a user knows what the wait is for (Ctrl-C ends it)
                    announced = True
                    log.warning("%s; waiting up to %.0f s for one to join", self._missing_text(start, end, adapter),
                                max(0.0, deadline - time.monotonic()))
                # short polls (time.sleep inside), so an interrupt ends the wait at once
                self.discovery.wait(
                    lambda _: not missing_ranges([_span(r) for r in self.servers(adapter)], start, end),
                    min(1.0, max(0.0, deadline - time.monotonic())))

    def quant_note(self, start: int = 0, end: int | None = None) -> str:
        """Why servers of blocks [start, end) are left out for their weight quantization ('' when none is): for
        error messages."""
        allowed = self.config.server_quant
        if allowed is None:
            return ""
        end = self.num_blocks if end is None else end
        others = sorted({r.quant for r in self.discovery.records(self._model_filter)
                         if r.state == "online" and r.quant not in allowed and r.start < end and start < r.end})
        if not others:
            return ""
        return (f"servers with {', '.join(others)} weights are left out: server_quant (--server-quant) allows "
                f"{', '.join(sorted(allowed))} only")

    def _missing_text(self, start: int, end: int, adapter: str | None) -> str:
        note = self.quant_note(start, end)
        text = _missing_text(self.spans(adapter), start, end) + (f"; {note}" if note else "")
        if adapter is None:
            return text
        return text.replace("no server covers", f"no server with adapter {adapter!r} covers", 1).replace(
            "(live servers cover", "(servers with it cover", 1)

    # --- requests --------------------------------------------------------------------------------------------------

    def retry(self, attempt: Callable[[], Any], what: str) -> Any:
        """Run `attempt` until it succeeds; each failure of a server bans it and tries again (bounded)."""
        for _ in range(self.config.max_retries):
            try:
                return attempt()
            except RECOVERABLE as e:
                self.ban_failed(e)
        raise SwarmError(f"{what} failed on {self.config.max_retries} routes in a row; giving up")

    def call(self, hop: Hop, msg_type: str, fields: dict[str, Any], tensors: list[torch.Tensor],
             timeout: float | None = None, channel: str = "") -> Message:
        """One request as wire parts (every request of this client goes through here); a recoverable failure of the
        server is raised as HopFailed."""
        try:
            reply = unpack(self._client(hop.peer, channel).call(msg_type, fields, tensors, timeout=timeout),
                           self.codecs)
        except RECOVERABLE as e:
            raise HopFailed(hop, e) from e
        self._forgive(hop.peer)
        return reply

    def send(self, hop: Hop, request: RequestMessage, timeout: float | None = None, channel: str = "") -> Message:
        """Send one request message to `hop`'s server and wait for its reply (hidden states and gradients
        compressed both ways with `codec_for` the server)."""
        return self.call(hop, *self.wire(hop.peer, request), timeout=timeout, channel=channel)

    def wire(self, peer: str, request: RequestMessage) -> tuple[str, dict[str, Any], list[torch.Tensor]]:
        """`request`'s wire parts for `peer`: its hidden states and gradients packed with `codec_for(peer)`, which
        the request also asks its reply in."""
        msg_type, fields, tensors = request.to_wire()
        codec = self.codec_for(peer) if msg_type in COMPRESSED else "none"
        if codec == "none":
            return msg_type, fields, tensors
        return (msg_type, *pack({**fields, COMPRESS: codec}, tensors, codec, self.codecs))

    def submit(self, hop: Hop, request: RequestMessage, timeout: float | None = None, channel: str = "") -> Future:
        """`send` on a background thread; the future holds the reply or the error."""
        return self._pool.submit(self.send, hop, request, timeout, channel)

    def close(self) -> None:
        """Stop the pinger and close every connection (and discovery, when these peers own it)."""
        self._finalizer()


def read_reply(reply_type: Callable[[Message], _Reply], message: Message, hop: Hop) -> _Reply:
    """`reply_type.from_wire(message)`; a malformed reply is a SwarmError naming the server."""
    try:
        return reply_type(message)
    except ProtocolError as e:
        raise SwarmError(f"{hop.peer} answered with a malformed reply: {e}") from None


def same_shape(tensor: torch.Tensor, like: torch.Tensor, hop: Hop, what: str = "tensor") -> torch.Tensor:
    """`tensor` in `like`'s dtype, after checking that a server answered it in `like`'s shape."""
    if tensor.shape != like.shape:
        raise SwarmError(f"{hop.peer} answered a {what} of shape {list(tensor.shape)}, expected "
                         f"{list(like.shape)}")
    return tensor.to(like.dtype)


def hop_prompts(prompts: torch.Tensor | None, hop: Hop, rows: slice | None = None) -> torch.Tensor | None:
    """The deep prompts of `hop`'s blocks (for `rows` of the batch, unless one prompt serves every row)."""
    if prompts is None:
        return None
    prompts = prompts[hop.start:hop.end]
    return prompts if rows is None or prompts.shape[1] == 1 else prompts[:, rows]


def _release(clients: dict[str, RpcClient], discovery: Discovery | None, stop_pings: threading.Event,
             pool: ThreadPoolExecutor) -> None:
    stop_pings.set()
    pool.shutdown(wait=False, cancel_futures=True)
    for client in clients.values():
        client.close()
    clients.clear()
    if discovery is not None:
        discovery.stop()


def _missing_text(spans: list[SpanInfo], start: int, end: int) -> str:
    """'no server covers blocks 2:4 of the model (live servers cover 0:2)', for warnings."""
    gaps = ", ".join(f"{a}:{b}" for a, b in missing_ranges(spans, start, end))
    served = ", ".join(f"{a}:{b}" for a, b in sorted({(s.start, s.end) for s in spans})) or "nothing"
    return f"no server covers blocks {gaps} of the model (live servers cover {served})"


def _span(record: ServerRecord, rtt: float | None = None, step_time: float | None = None) -> SpanInfo:
    """What routing knows of a server; its announced throughput is bounded by what a measured step allows."""
    throughput = record.throughput
    if step_time is not None:
        throughput = min(throughput, PROBE_SLACK / (max(step_time, 1e-6) * (record.end - record.start)))
    return SpanInfo(record.addresses[0], record.start, record.end, rtt=rtt, throughput=throughput,
                    cache_free=record.cache_tokens_free)
