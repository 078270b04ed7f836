"""A swarm server: loads a span of blocks, answers requests on a ZeroMQ ROUTER socket, stops cleanly.

`Server(config).start()` binds its socket first (a port in use or a bad host fails at once, not after minutes of
loading), loads the blocks, starts the compute worker and the I/O loop, and returns; `endpoint` is the address
clients use. `stop()` stops taking new sessions and work, finishes what is queued (bounded), and closes
the socket. The CLI's `swarm serve` wraps this with signal handling.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ... import __version__
from ...transport.discovery import Announcement, Discovery, DiscoveryConfig, local_endpoints
from ...transport.errors import ConfigError
from ...transport.keys import Admission, Identity, SwarmKey
from ...transport.records import MAX_PATH_CHARS, ServerRecord, sign_record
from ...transport.rpc import CurveClient, CurveServer, Request, RpcServer, RpcServerConfig
from ..adapters import check_peft
from ..aliases import announced_id
from ..weights import ModelSource
from .adapters import AdapterConfig, AdapterStore
from .backend import BlockSpan
from .cache import CacheBudget, SessionCache
from .engine import Engine, QueueLimits
from .handler import Handler, HandlerLimits
from .relay import Relay
from .scheduler import PassLimits

log = logging.getLogger(__name__)

MAX_ADAPTERS = 48  # adapter names in a record
MAX_ADAPTER_CHARS = 1600  # their characters together (a record stays under its 4 KiB bound)


def parse_blocks(text: str) -> tuple[int, int]:
    """`START:END` (half-open, 0-based) -> (start, end); raises ConfigError on anything else."""
    start_text, sep, end_text = text.partition(":")
    if not sep or not start_text.strip().isdigit() or not end_text.strip().isdigit():
        raise ConfigError(f"--blocks must be START:END with 0 <= START < END (half-open, like 20:40), got {text!r}")
    start, end = int(start_text), int(end_text)
    if start >= end:
        raise ConfigError(f"--blocks {text}: START must be smaller than END (the span is half-open)")
    return start, end


@dataclass
class ServerConfig:
    model: str  # hub model id or local directory
    blocks: tuple[int, int]  # [start, end) of the blocks to serve
    host: str = "0.0.0.0"  # interface to bind
    port: int = 0  # 0 = any free port
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    cache_tokens: int = 8192  # attention-cache budget (batch x max_length tokens) shared by all sessions
    limits: HandlerLimits = field(default_factory=HandlerLimits)
    initial_peers: list[str] = field(default_factory=list)  # servers to gossip with (besides those mDNS finds)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)  # mDNS and gossip settings
    model_id: str | None = None  # id to announce (default: the hub id, or the local directory's name)
    drain_timeout: float = 10.0  # seconds to finish queued work at shutdown
    poll_ms: int = 100  # I/O loop tick (session expiry granularity)
    link_delay: float = 0.0  # simulated one-way latency on this server's links to other servers (benchmarks)
    passes: PassLimits = field(default_factory=PassLimits)  # tokens and requests per pass, starvation bound
    queue: QueueLimits = field(default_factory=QueueLimits)  # requests and bytes waiting, per client too
    batching: bool = True  # False: one request per pass, whole (the old one-at-a-time engine, for comparisons)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)  # adapters served (preloaded, or from a directory)
    identity: str | None = None  # file of the server's key pair (made on first start); None: a new one each start
    swarm_key: str | None = None  # a private swarm's key file (swarm keygen): every connection CurveZMQ, members only
    allowed_keys: str | None = None  # directory of member keys admitted besides the swarm key (re-read on change)
    unread_bytes: int = 64 << 20  # reply bytes one peer may leave unread before its further replies are dropped


class Server:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.source = ModelSource(config.model)
        self.span: BlockSpan | None = None
        self._rpc: RpcServer | None = None
        self._engine: Engine | None = None
        self.adapters: AdapterStore | None = None
        self.handler: Handler | None = None
        self.discovery: Discovery | None = None
        self.identity = Identity() if config.identity is None else Identity.load_or_create(config.identity)
        self.peer_id = self.identity.peer_id  # its public key: no one else can sign records for it
        self.model_id = config.model_id or announced_id(config.model)
        self.throughput = 0.0
        self._record: ServerRecord | None = None
        self._record_lock = threading.Lock()
        self.swarm_key: SwarmKey | None = None
        self._admission: Admission | None = None
        if config.swarm_key is not None:
            self.swarm_key = SwarmKey.load(config.swarm_key)
            if not self.swarm_key.can_serve:
                raise ConfigError(f"{config.swarm_key} is a member key: it connects to a private swarm but cannot "
                                  "serve in it (servers hold the swarm key itself)")
            self._admission = Admission(self.swarm_key, config.allowed_keys)
        elif config.allowed_keys is not None:
            raise ConfigError("--allowed-keys needs --swarm-key: only a private swarm admits keys")
        curve = None if self.swarm_key is None else CurveClient.of(self.swarm_key)
        self._relay = Relay(timeout=config.limits.session_timeout, link_delay=config.link_delay, curve=curve)
        self._stopped = threading.Event()

    def start(self) -> Server:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def num_blocks(self) -> int:
        """How many blocks the model has (reads its config only)."""
        return self.source.family().num_blocks(self.source.config(self.config.dtype))

    def _start(self) -> Server:
        config = self.config
        if config.cache_tokens < 0:
            raise ConfigError("--cache-tokens must be 0 or more")
        # bind before anything slow; the I/O loop starts (and requests reach the handler) only once it exists
        key = self.swarm_key
        curve = None if key is None else CurveServer(key.public, key.secret, self._admission)
        self._rpc = RpcServer(self._dispatch, RpcServerConfig(host=config.host, port=config.port,
                                                              poll_ms=config.poll_ms, curve=curve,
                                                              max_unread_bytes=config.unread_bytes), tick=self._tick)
        dtype = self.source.config(config.dtype).dtype
        for adapter in config.adapters.preload:  # a wrong file or option fails now, not after loading the blocks
            check_peft(adapter)
        started = time.perf_counter()
        self.span = BlockSpan.load(self.source, *config.blocks, dtype=dtype)  # checks the span before reading weights
        log.info("loaded blocks %d:%d of %s (%s) in %.1f s", *config.blocks, config.model,
                 str(dtype).removeprefix("torch."), time.perf_counter() - started)
        self.adapters = AdapterStore(self.span, config.adapters)
        self.adapters.load_preloaded()  # a bad adapter stops the start with a clear error
        per_token = SessionCache.bytes_per_token(len(self.span.blocks), self.span.kv_heads, self.span.head_dim, dtype)
        passes = config.passes if config.batching else PassLimits(max_tokens=1 << 62, max_requests=1,
                                                                  starve_after=config.passes.starve_after)
        budget = CacheBudget(config.cache_tokens)
        self._engine = Engine(self.span, passes, config.queue, budget).start()
        self.throughput = measure_throughput(self.span)
        self.handler = Handler(self.span, self._engine, budget, self.model_id,
                               config.limits, extra_info={"version": __version__, "peer_id": self.peer_id,
                                                          "cache_bytes_per_token": per_token,
                                                          "throughput": self.throughput},
                               on_gossip=self._on_gossip, relay=self._relay, relay_allowed=self._known_peer,
                               adapters=self.adapters, peer_limits={"unread_reply_bytes": config.unread_bytes})
        self._rpc.start()
        self.addresses = local_endpoints(config.host, self._rpc.port)
        discovery = config.discovery if key is None else replace(config.discovery, swarm_key=key)
        self.discovery = Discovery(config.initial_peers, discovery, own_record=self.record,
                                   announce=Announcement(self.peer_id, self._rpc.port, self.model_id, config.host))
        self.discovery.start()
        return self

    def _dispatch(self, request: Request) -> None:
        if self.handler is not None:  # always set: the I/O loop starts after the handler is built
            self.handler(request)

    @property
    def admission(self) -> Admission | None:
        """Which keys a private swarm's server admits (None in an open swarm)."""
        return self._admission

    def _tick(self) -> None:
        if self._admission is not None:
            self._admission.refresh()
        if self.handler is not None:
            self.handler.tick()

    def record(self, state: str | None = None) -> ServerRecord:
        """This server's record, republished (seq + 1) with fresh load figures."""
        span, handler = self.span, self.handler
        if span is None or handler is None:
            raise RuntimeError("server is not started")
        with self._record_lock:
            load = handler.engine.stats()
            changes = dict(state=state or ("online" if handler.accepting else "draining"),
                           cache_tokens_free=handler.budget.free, queue=load["queue"],
                           batch_sessions=load["batch"]["sessions"], batch_tokens=load["batch"]["tokens"],
                           adapters=self._announced_adapters())
            if self._record is None:
                # seq starts from the wall clock, so a restart with the same identity is newer than what peers hold
                changes["seq"] = int(time.time() * 1000)
                self._record = ServerRecord(
                    peer_id=self.peer_id, model=self.model_id, start=span.start, end=span.end,
                    num_blocks=span.family.num_blocks(span.config), hidden_size=span.hidden_size,
                    addresses=self.addresses, throughput=self.throughput, cache_tokens_total=handler.budget.total,
                    dtype=str(span.dtype).removeprefix("torch."), version=__version__, path=self._local_path(),
                    capabilities=handler.capabilities,
                    ttl=self.config.discovery.record_ttl, **changes)
            else:
                self._record = self._record.bump(**changes)
            self._record = sign_record(self._record, self.identity)
            return self._record

    def _announced_adapters(self) -> tuple[str, ...]:
        """The adapters this server holds or can load, as many as fit in a record (the ones given at start first)."""
        names, size = [], 0
        for name in [] if self.adapters is None else self.adapters.names():
            size += len(name) + 2
            if size > MAX_ADAPTER_CHARS or len(names) >= MAX_ADAPTERS:
                log.debug("announcing %d adapters of %d", len(names), len(self.adapters.names()))
                break
            names.append(name)
        return tuple(names)

    def _local_path(self) -> str:
        """The model directory's absolute path, announced so a client on this machine can use it ("" for a hub id
        or a path too long for a record)."""
        path = "" if self.source.local is None else str(Path(self.config.model).expanduser().resolve())
        return path if len(path) <= MAX_PATH_CHARS and path.isprintable() else ""

    def _known_peer(self, endpoint: str) -> bool:
        """Whether `endpoint` is a server of this model that discovery knows (the only relay targets)."""
        if self.discovery is None:
            return False
        return any(endpoint in r.addresses for r in self.discovery.records(lambda r: r.model == self.model_id))

    def _on_gossip(self, fields: dict) -> dict:
        if self.discovery is None:
            return {"records": []}
        return self.discovery.handle_gossip(fields)

    @property
    def endpoint(self) -> str:
        if self._rpc is None:
            raise RuntimeError("server is not started")
        return self._rpc.endpoint

    def stop(self) -> None:
        """Stop taking work, finish what is queued (bounded by drain_timeout), close the socket."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.handler is not None:
            self.handler.accepting = False
        if self.discovery is not None:  # tell the swarm first, so clients stop routing here
            offline = self.record("offline") if self.span is not None and self.handler is not None else None
            self.discovery.stop(offline=offline)
        if self._engine is not None:
            self._engine.stop(self.config.drain_timeout)
        if self._rpc is not None:
            time.sleep(0.05)  # let the I/O thread flush replies of the last tasks
            self._rpc.stop()
        self._relay.close()
        if self.adapters is not None:
            self.adapters.close()
        if self.handler is not None:
            self.handler.close_all()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def measure_throughput(span: BlockSpan, tokens: int = 32, repeats: int = 3) -> float:
    """Tokens/s of a forward pass through the whole span (best of a few short runs): a cheap speed figure."""
    import torch

    hidden = torch.randn(1, tokens, span.hidden_size, generator=torch.Generator().manual_seed(0)).to(span.dtype)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            started = time.perf_counter()
            span(hidden)
            best = min(best, time.perf_counter() - started)
    return round(tokens / max(best, 1e-9), 1)


__all__ = ["Server", "ServerConfig", "measure_throughput", "parse_blocks"]
