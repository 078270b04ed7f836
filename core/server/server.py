"""A swarm server: loads a span of blocks, answers requests on a ZeroMQ ROUTER socket, stops cleanly.

`Server(config).start()` binds its socket first (a port in use or a bad host fails at once, not after minutes of
loading), loads the blocks, starts the compute worker and the I/O loop, and returns; `endpoint` is the address
clients use. `stop()` stops taking new sessions and work, finishes what is queued (bounded), and closes
the socket. The CLI's `swarm serve` wraps this with signal handling.

Placement. With `blocks` given, the server serves that span and never moves. Without it, the server
1. resolves its throughput (throughput.py: cached, measured, or given) and how many blocks it holds (`num_blocks`, or
   as many as fit in `max_memory`: placement.py);
2. listens to the swarm for a few gossip periods (jittered, so servers that start together do not decide at the same
   instant), then chooses its span with core/balance.py's `choose_span` over the signed records of its model, and
   announces it at once as `joining` (others that choose after see it); listens two more periods and chooses again
   with what others announced meanwhile (servers still joining count only when their peer id is smaller: they
   settle in that order), until its choice holds (`_choose`); then loads it, and goes `online`;
3. every `balance.period` (jittered) asks its `Rebalancer` whether moving would raise the swarm's bottleneck enough
   (the policy, its hysteresis, its minimum interval and its rule never to leave a block uncovered live there) and
   moves when told to (`move`).

A move: the record says `draining` and the handler takes no new sessions or forwards (refused as `busy`, which a
client routes around); the running sessions get up to `balance.drain` seconds to finish; the new span is loaded
meanwhile when memory holds both (`fits_both`), else after the old one is freed (the record then says `joining` with
the new span); then the new span's engine and handler take over in one assignment, the old sessions are closed (a
client whose session was closed replays its history elsewhere, as after a failure) and the record says `online`.
Moves are counted in the record (`moves`) and listed in `info` with their reasons.

Weights. `quant` (none | int8 | nf4) quantizes the blocks' linear layers as they load (quant/weights.py); `auto`
chooses at start, before placement, the least compression with which the blocks asked for fit in memory
(placement.py's `choose_quant`). Placement counts blocks at their quantized size, the throughput is measured on a
quantized block (and cached under its own key), and the record and `info` announce the quantization (`quant`).

Metrics. With `metrics_port`, the server serves Prometheus metrics over HTTP (metrics.py), from its start to its stop.
"""

from __future__ import annotations

import gc
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ... import __version__
from ...quant.codecs import CODECS
from ...quant.compression import WireCodecs
from ...quant.weights import weight_bytes
from ...transport.discovery import Announcement, Discovery, DiscoveryConfig, local_endpoints
from ...transport.errors import ConfigError
from ...transport.keys import Admission, Identity, SwarmKey
from ...transport.messages import CAPABILITIES
from ...transport.records import MAX_PATH_CHARS, ServerRecord, sign_record
from ...transport.rpc import CurveClient, CurveServer, Request, RpcServer, RpcServerConfig
from ..adapters import check_peft, model_linears
from ..aliases import announced_id
from ..device import resolve_device
from ..weights import ModelSource
from .adapters import AdapterConfig, AdapterStore, trim_heap
from .backend import BlockSpan
from .cache import CacheBudget, SessionCache
from .engine import Engine, QueueLimits, Refused
from .handler import Handler, HandlerLimits
from .placement import (
    BalanceSettings,
    available_memory,
    block_cost,
    blocks_for_memory,
    choose_quant,
    fits_both,
    parse_quant,
)
from .relay import Relay
from .scheduler import PassLimits
from .throughput import DEFAULT_BANDWIDTH, Throughput, resolve

if TYPE_CHECKING:
    from .metrics import ServerMetrics

log = logging.getLogger(__name__)

MAX_ADAPTERS = 48  # adapter names in a record
MAX_ADAPTER_CHARS = 1600  # their characters together (a record stays under its 4 KiB bound)
MOVES_KEPT = 8  # recent moves listed in `info`
SETTLE_ROUNDS = 4  # choices announced (as joining) and checked against what others chose meanwhile, at most


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
    blocks: tuple[int, int] | None  # [start, end) of the blocks to serve (never moves); None: chosen and moved
    host: str = "0.0.0.0"  # interface to bind
    port: int = 0  # 0 = any free port
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: the checkpoint's on a CPU, 16-bit on a GPU)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps (auto: the first CUDA GPU when there is one, else cpu)
    quant: str = "none"  # weight quantization of the blocks' linear layers: none | int8 | nf4 | auto (placement.py)
    cache_tokens: int = 8192  # attention-cache budget (batch x max_length tokens) shared by all sessions
    limits: HandlerLimits = field(default_factory=HandlerLimits)
    initial_peers: list[str] = field(default_factory=list)  # servers to gossip with (besides those mDNS finds)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)  # mDNS and gossip settings
    model_id: str | None = None  # id to announce (default: the hub id, or the local directory's name)
    drain_timeout: float = 10.0  # seconds to finish queued work at shutdown
    poll_ms: int = 100  # I/O loop tick (session expiry granularity)
    link_delay: float = 0.0  # simulated one-way latency on this server's links to other servers (benchmarks)
    compression: tuple[str, ...] = CODECS[1:]  # codecs of hidden states it decodes and sends (announced); (): none
    passes: PassLimits = field(default_factory=PassLimits)  # tokens and requests per pass, starvation bound
    queue: QueueLimits = field(default_factory=QueueLimits)  # requests and bytes waiting, per client too
    batching: bool = True  # False: one request per pass, whole (the old one-at-a-time engine, for comparisons)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)  # adapters served (preloaded, or from a directory)
    identity: str | None = None  # file of the server's key pair (made on first start); None: a new one each start
    swarm_key: str | None = None  # a private swarm's key file (swarm keygen): every connection CurveZMQ, members only
    allowed_keys: str | None = None  # directory of member keys admitted besides the swarm key (re-read on change)
    unread_bytes: int = 64 << 20  # reply bytes one peer may leave unread before its further replies are dropped
    num_blocks: int | None = None  # without `blocks`: how many to hold (None: as many as fit in max_memory)
    max_memory: int | None = None  # bytes the blocks and their cache may take (None: a share of what is free)
    throughput: str | float = "auto"  # auto (cached, else measured) | eval (measured anew) | tokens/s as given
    throughput_cache: str | None = None  # file of cached measurements (the CLI's is under $SWARM_CACHE_DIR); None:
    #                                     measured at every start, nothing written
    bandwidth: float = DEFAULT_BANDWIDTH  # Mbit/s of the link to other servers (bounds the announced throughput)
    balance: BalanceSettings = field(default_factory=BalanceSettings)  # listening, rebalancing, moves
    metrics_port: int | None = None  # Prometheus metrics at http://metrics_host:PORT/metrics (0: any free port;
    #                                  None: off, no port opened): metrics.py
    metrics_host: str = "127.0.0.1"  # interface the metrics listen on


class Server:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.source = ModelSource(config.model)
        self.device = resolve_device(config.device)  # a device this machine lacks is refused here
        self.span: BlockSpan | None = None
        self._rpc: RpcServer | None = None
        self._engine: Engine | None = None
        self.adapters: AdapterStore | None = None
        self.handler: Handler | None = None
        self.discovery: Discovery | None = None
        self.identity = Identity() if config.identity is None else Identity.load_or_create(config.identity)
        self.peer_id = self.identity.peer_id  # its public key: no one else can sign records for it
        self.model_id = config.model_id or announced_id(config.model)
        self.throughput = 0.0  # the announced figure (throughput.py)
        self.quant = "none"  # the blocks' weight quantization (none | int8 | nf4; `auto` resolved at start)
        self.measured: Throughput | None = None
        self.blocks: tuple[int, int] | None = None  # the span announced (chosen before it is loaded)
        self.state = "joining"  # joining | online | draining (offline only in the last record)
        self.moves = 0
        self.recent_moves: deque[dict[str, Any]] = deque(maxlen=MOVES_KEPT)
        self.memory: int | None = None  # bytes the server may use (automatic placement only)
        self._engine_args: tuple[PassLimits, int] | None = None
        self._info: dict[str, Any] = {}  # extra `info` fields, one dict shared by every handler the server has
        self._swap_lock = threading.Lock()  # a move's swap of span, engine and handler against stop()
        self._balancer: threading.Thread | None = None
        self._meta: tuple[int, int, str] | None = None  # the model's blocks, hidden size, dtype (read at start)
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
        try:
            self._codecs = WireCodecs(tuple(config.compression))  # a wrong name fails here, at once
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self._stopped = threading.Event()
        self.metrics: ServerMetrics | None = None  # with `metrics_port`: its registry and listener (metrics.py)

    def start(self) -> Server:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def num_blocks(self) -> int:
        """How many blocks the model has (reads its config only)."""
        return self.source.family().num_blocks(self.source.config(self.config.dtype, self.device))

    def _start(self) -> Server:
        config = self.config
        if config.cache_tokens < 0:
            raise ConfigError("--cache-tokens must be 0 or more")
        # bind before anything slow; until the blocks are loaded, the I/O loop answers gossip only (`_dispatch`)
        key = self.swarm_key
        curve = None if key is None else CurveServer(key.public, key.secret, self._admission)
        if config.metrics_port is not None:  # bound before anything slow too (prometheus_client imported only then)
            from .metrics import ServerMetrics

            self.metrics = ServerMetrics(self, lambda: self._rpc).start(config.metrics_host, config.metrics_port)
        self._rpc = RpcServer(self._dispatch, RpcServerConfig(host=config.host, port=config.port,
                                                              poll_ms=config.poll_ms, curve=curve,
                                                              max_unread_bytes=config.unread_bytes), tick=self._tick,
                              on_answer=None if self.metrics is None else self.metrics.answered)
        model_config = self.source.config(config.dtype, self.device)
        dtype, family = model_config.dtype, self.source.family()
        total = family.num_blocks(model_config)
        for adapter in config.adapters.preload:  # a wrong file or option fails now, not after loading the blocks
            check_peft(adapter, model_linears(family, model_config, 0))
        self.quant = self._resolve_quant(family, model_config, total)
        length = self._span_length(family, model_config, total)
        self.measured = resolve(config.throughput, self.model_id, family, model_config, dtype, config.bandwidth,
                                None if config.throughput_cache is None else Path(config.throughput_cache),
                                self.device, quant=self.quant)
        self.throughput = self.measured.announced(length)
        self._info.update(version=__version__, peer_id=self.peer_id, throughput=self.throughput,
                          throughput_detail=self.measured.info(length),
                          placement="manual" if config.blocks is not None else "automatic", quant_option=config.quant,
                          moves=[], moves_total=0)
        self._engine_args = (config.passes if config.batching else
                             PassLimits(max_tokens=1 << 62, max_requests=1, starve_after=config.passes.starve_after),
                             config.cache_tokens)
        self._meta = (total, int(model_config.hidden_size), str(dtype).removeprefix("torch."))
        self._rpc.start()
        self.addresses = local_endpoints(config.host, self._rpc.port)
        discovery = config.discovery if key is None else replace(config.discovery, swarm_key=key)
        self.discovery = Discovery(config.initial_peers, discovery, own_record=self._own_record,
                                   announce=Announcement(self.peer_id, self._rpc.port, self.model_id, config.host))
        self.discovery.start()
        # a server placed by hand says nothing until it serves; one that chooses announces its choice as `joining`
        blocks = config.blocks if config.blocks is not None else self._choose(total, length)
        self._install(*self._load(*blocks))
        self.state = "online"
        self._publish()
        if config.blocks is None and config.balance.rebalance:
            self._balancer = threading.Thread(target=self._balance_loop, name="swarm-balance", daemon=True)
            self._balancer.start()
        return self

    def _resolve_quant(self, family: Any, model_config: Any, total: int) -> str:
        """The weight quantization to load with: `quant` as given, or for `auto` the least compression with which
        the blocks asked for (the span of `blocks`, else `num_blocks`, else the whole model) fit in the memory
        (`max_memory`, else a share of what is free): placement.py's `choose_quant`."""
        config = self.config
        quant = parse_quant(config.quant)
        if quant != "auto":
            _note_small_saving(family, model_config, quant)
            return quant
        wanted = (config.blocks[1] - config.blocks[0] if config.blocks is not None
                  else config.num_blocks if config.num_blocks is not None else total)
        memory = config.max_memory if config.max_memory is not None else available_memory(str(self.device))
        costs = {mode: block_cost(family, model_config, model_config.dtype, mode) for mode in ("none", "int8", "nf4")}
        quant = choose_quant(memory, costs, config.cache_tokens, wanted)
        _note_small_saving(family, model_config, quant)
        log.info("--quant auto: %s (%d blocks wanted, %.1f GiB of memory; weights per block: %s)", quant, wanted,
                 memory / (1 << 30), ", ".join(f"{m} {c.weights / (1 << 20):.1f} MiB" for m, c in costs.items()))
        return quant

    def _span_length(self, family: Any, model_config: Any, total: int) -> int:
        """How many blocks the server holds: its `blocks`, its `num_blocks`, or as many as fit in its memory."""
        config = self.config
        if config.blocks is not None:
            start, end = config.blocks
            if not 0 <= start < end <= total:
                raise ConfigError(f"blocks {start}:{end} are outside the model's {total} blocks (0:{total})")
            return end - start
        cost = block_cost(family, model_config, model_config.dtype, self.quant)
        self.memory = config.max_memory if config.max_memory is not None else available_memory(str(self.device))
        if config.num_blocks is not None:
            if not 1 <= config.num_blocks <= total:
                raise ConfigError(f"--num-blocks must be in 1..{total} (the model's blocks), got {config.num_blocks}")
            if config.max_memory is not None:  # told both: they must agree
                fit = blocks_for_memory(config.max_memory, cost, config.cache_tokens, total)
                if fit < config.num_blocks:
                    raise ConfigError(f"--num-blocks {config.num_blocks} does not fit in --max-memory: it holds "
                                      f"{fit} blocks with a cache of {config.cache_tokens} tokens")
            return config.num_blocks
        count = blocks_for_memory(self.memory, cost, config.cache_tokens, total)
        log.info("holding %d of %d blocks: %.1f GiB of memory, %.0f MiB per block (weights and cache)", count, total,
                 self.memory / (1 << 30), cost.per_block(config.cache_tokens) / (1 << 20))
        return count

    def _choose(self, total: int, length: int) -> tuple[int, int]:
        """Listen to the swarm a few gossip periods (jittered), choose the span it needs most, and settle it: announce
        it as `joining`, listen again, and choose again with what others announced meanwhile (servers that started
        together saw none of each other's choices the first time); stop when the choice holds, or after
        SETTLE_ROUNDS. Nothing is loaded yet, so changing one's mind costs nothing."""
        from ..balance import choose_span, servers_from_records

        balance, discovery = self.config.balance, self.discovery
        period = self.config.discovery.gossip.period
        listen = balance.listen if balance.listen is not None else 3 * period
        if discovery is None:
            raise RuntimeError("server is not started")
        discovery.listen(listen * random.uniform(1.0, 1.5))
        chosen: tuple[int, int] | None = None
        servers: list[Any] = []
        for _ in range(SETTLE_ROUNDS):
            # servers still choosing with a larger peer id adapt to us, not we to them: servers that start together
            # settle in the order of their ids instead of all jumping to the same better span at once
            records = discovery.records(lambda r: r.model == self.model_id and not self._suspected(r)
                                        and not (r.state == "joining" and r.peer_id > self.peer_id))
            servers = servers_from_records(records, self.model_id)
            choice = choose_span(servers, total, length, self.throughput, me=self.peer_id)
            if choice == chosen:
                break
            if chosen is not None:
                log.info("blocks %d:%d are taken meanwhile; choosing %d:%d instead", *chosen, *choice)
            chosen = self.blocks = choice
            self._publish()  # `joining` with the chosen span: servers that choose after us count us in
            discovery.listen(2 * period * random.uniform(1.0, 1.5))
        if chosen is None:
            raise RuntimeError("no span chosen")
        others = sum(1 for s in servers if s.peer_id != self.peer_id)
        log.info("chose blocks %d:%d of %d (%d other servers known)", *chosen, total, others)
        return chosen

    def _load(self, start: int, end: int) -> tuple[BlockSpan, AdapterStore, Engine, Handler]:
        """Blocks [start, end) loaded, with their adapters, a started engine and a handler (not serving yet)."""
        config = self.config
        if self._engine_args is None:
            raise RuntimeError("server is not started")
        passes, cache_tokens = self._engine_args
        dtype = self.source.config(config.dtype, self.device).dtype
        started = time.perf_counter()
        span = BlockSpan.load(self.source, start, end, dtype, self.device, self.quant)  # checks the span first
        log.info("loaded blocks %d:%d of %s (%s%s on %s, %.0f MiB of weights) in %.1f s", start, end, config.model,
                 str(dtype).removeprefix("torch."), "" if self.quant == "none" else f", {self.quant}", self.device,
                 weight_bytes(span.blocks) / (1 << 20), time.perf_counter() - started)
        adapters = engine = None
        try:
            adapters = AdapterStore(span, config.adapters)
            adapters.load_preloaded()  # a bad adapter stops the start with a clear error
            budget = CacheBudget(cache_tokens)
            observe = None if self.metrics is None else self.metrics.pass_observer((start, end))
            engine = Engine(span, passes, config.queue, budget, observe=observe).start()
            self._info["weight_bytes"] = weight_bytes(span.blocks)
            self._info["cache_bytes_per_token"] = SessionCache.bytes_per_token(len(span.blocks), span.kv_heads,
                                                                               span.head_dim, dtype)
            handler = Handler(span, engine, budget, self.model_id, config.limits, extra_info=self._info,
                              on_gossip=self._on_gossip, relay=self._relay, relay_allowed=self._known_peer,
                              adapters=adapters, peer_limits={"unread_reply_bytes": config.unread_bytes},
                              codecs=self._codecs)
        except BaseException:
            if engine is not None:
                engine.stop(0)
            if adapters is not None:
                adapters.close()
            raise
        return span, adapters, engine, handler

    def _install(self, span: BlockSpan, adapters: AdapterStore, engine: Engine, handler: Handler) -> None:
        """Serve with these (the I/O thread reads `handler` once per request: the swap is one assignment)."""
        with self._swap_lock:
            stopped = self._stopped.is_set()
            if not stopped:
                self.span, self.adapters, self._engine = span, adapters, engine
                self.blocks = (span.start, span.end)
                self.handler = handler
        if stopped:  # stop() came while loading: these were never served
            _close(None, engine, adapters, 0)

    def _dispatch(self, request: Request) -> None:
        handler = self.handler
        if handler is not None:
            handler(request)
        elif request.message.type == "gossip":  # still choosing or loading: the swarm may already hear from us
            request.reply(self._on_gossip(dict(request.message.fields)))
        else:
            raise Refused("busy", "this server is loading its blocks; try another, or again in a while")

    @property
    def admission(self) -> Admission | None:
        """Which keys a private swarm's server admits (None in an open swarm)."""
        return self._admission

    def _tick(self) -> None:
        if self._admission is not None:
            self._admission.refresh()
        if self.handler is not None:
            self.handler.tick()

    def _own_record(self) -> ServerRecord | None:
        """The record gossip refreshes every round: none until the server knows which blocks it serves."""
        return None if self.blocks is None or self._stopped.is_set() else self.record()

    def _publish(self) -> None:
        """Tell the swarm now (one gossip round) rather than at the next period: a new state or span."""
        if self.discovery is not None and self.blocks is not None:
            self.discovery.refresh()

    def record(self, state: str | None = None) -> ServerRecord:
        """This server's record, republished (seq + 1) with fresh load figures."""
        blocks, handler = self.blocks, self.handler
        if blocks is None:
            raise RuntimeError("server is not started")
        with self._record_lock:
            if handler is not None and blocks == (handler.span.start, handler.span.end):
                load = handler.engine.stats()
                figures = dict(cache_tokens_free=handler.budget.free, queue=load["queue"],
                               batch_sessions=load["batch"]["sessions"], batch_tokens=load["batch"]["tokens"],
                               capabilities=handler.capabilities)
                if state is None and not handler.accepting and self.state == "online":
                    state = "draining"  # stopping
            else:  # the span is chosen and not loaded yet: no room to offer
                figures = dict(cache_tokens_free=0, queue=0, batch_sessions=0.0, batch_tokens=0.0,
                               capabilities=CAPABILITIES)
            if self._meta is None:
                raise RuntimeError("server is not started")
            total, hidden_size, dtype = self._meta
            changes = dict(state=state or self.state, start=blocks[0], end=blocks[1],
                           adapters=self._announced_adapters(), moves=self.moves, **figures)
            if self._record is None:
                # seq starts from the wall clock, so a restart with the same identity is newer than what peers hold
                changes["seq"] = int(time.time() * 1000)
                self._record = ServerRecord(
                    peer_id=self.peer_id, model=self.model_id, num_blocks=total, hidden_size=hidden_size,
                    addresses=self.addresses, throughput=self.throughput,
                    cache_tokens_total=self.config.cache_tokens, dtype=dtype, quant=self.quant, version=__version__,
                    device=self.device.type,
                    path=self._local_path(), ttl=self.config.discovery.record_ttl, **changes)
            else:
                self._record = self._record.bump(**changes)
            self._record = sign_record(self._record, self.identity)
            return self._record

    # --- rebalancing -----------------------------------------------------------------------------------------------

    def _balance_loop(self) -> None:
        from ..balance import BalanceConfig, Rebalancer

        settings = self.config.balance
        rebalancer = Rebalancer(BalanceConfig(balance_quality=settings.quality, min_interval=settings.min_interval,
                                              confirmations=settings.confirmations), time.monotonic)
        while not self._stopped.wait(settings.period * random.uniform(0.8, 1.2)):
            try:
                self.check_balance(rebalancer)
            except Exception:  # the loop must outlive one bad check; the server goes on serving where it is
                log.exception("rebalancing failed")

    def placement_view(self) -> list[Any]:
        """The servers of this model the balance policies count (`ServerLoad`s): signed, online or joining, and not
        suspected."""
        from ..balance import servers_from_records

        if self.discovery is None:
            return []
        return servers_from_records(self.discovery.records(lambda r: r.model == self.model_id
                                                           and not self._suspected(r)), self.model_id)

    def _suspected(self, record: ServerRecord) -> bool:
        """Whether gossip has not heard from `record`'s server for a while (it may have crashed without saying so):
        placement leaves it out rather than count on blocks that may have no server any more."""
        heard = None if self.discovery is None else self.discovery.membership.heard(record.peer_id)
        return heard is not None and heard.suspected

    def check_balance(self, rebalancer: Any) -> bool:
        """One check of the balance (and the move it asks for); returns whether the server moved."""
        if self.discovery is None or self._stopped.is_set() or self.state != "online":
            return False
        total = 0 if self._meta is None else self._meta[0]
        move = rebalancer.check(self.placement_view(), total, self.peer_id)
        if move is None:
            return False
        self.move(move.start, move.end, move.reason)
        rebalancer.moved()
        return True

    def move(self, start: int, end: int, reason: str = "") -> None:
        """Serve blocks [start, end) instead of the current span: drain, load, swap, announce (see the docstring).

        When loading the new span fails, the server goes back to serving its old one (reloaded, if it was freed
        first); when that fails too, it stops."""
        old_blocks, old, old_adapters = self.blocks, self.handler, self.adapters
        if old is None or old_blocks is None or self._stopped.is_set() or (start, end) == old_blocks:
            return
        total = 0 if self._meta is None else self._meta[0]
        if not 0 <= start < end <= total:
            raise ConfigError(f"cannot move to blocks {start}:{end}: the model has {total} blocks")
        log.info("moving from blocks %d:%d to %d:%d: %s", *old_blocks, start, end, reason or "asked to")
        began = time.monotonic()
        self.state = "draining"
        old.accepting = False  # new sessions and forwards are refused (busy): clients go elsewhere
        self._publish()
        cost = block_cost(old.span.family, old.span.config, old.span.dtype, old.span.quant)
        memory = (next((m for m in (self.memory, self.config.max_memory) if m is not None), None)
                  or available_memory(str(self.device)))
        early = fits_both(memory, cost, self.config.cache_tokens, old_blocks[1] - old_blocks[0], end - start)
        try:
            loaded = self._load(start, end) if early else None  # while the running sessions finish
        except Exception:
            log.exception("could not load blocks %d:%d; staying on %d:%d", start, end, *old_blocks)
            old.accepting, self.state = True, "online"
            self._publish()
            return
        deadline = time.monotonic() + self.config.balance.drain
        while (old.sessions or old.engine.pending) and time.monotonic() < deadline and not self._stopped.is_set():
            time.sleep(0.02)
        left = len(old.sessions)
        if loaded is None:  # memory holds one span only: free the old one first
            with self._swap_lock:
                self.handler = None  # until the new span is loaded, requests are refused (busy)
                self.span = self._engine = self.adapters = None
            _close(old, old.engine, old_adapters, self.config.drain_timeout)
            old = old_adapters = None  # the last references to the old blocks: their memory goes now
            gc.collect()
            trim_heap()
            self.blocks, self.state = (start, end), "joining"
            self._publish()
            try:
                loaded = self._load(start, end)
            except Exception:
                log.exception("could not load blocks %d:%d; loading %d:%d again", start, end, *old_blocks)
                start, end = old_blocks
                self.blocks = old_blocks
                try:
                    loaded = self._load(*old_blocks)
                except Exception:
                    log.exception("could not load blocks %d:%d again either; stopping", *old_blocks)
                    self.stop()
                    return
        self._install(*loaded)
        if self._stopped.is_set():
            return
        if old is not None:  # the old span served while the new one loaded: now it goes
            _close(old, old.engine, old_adapters, self.config.drain_timeout)
            old = old_adapters = None
        loaded = None
        gc.collect()
        trim_heap()
        if (start, end) != old_blocks:
            self.moves += 1
            entry = {"at": round(time.time(), 3), "from": list(old_blocks), "to": [start, end], "reason": reason,
                     "seconds": round(time.monotonic() - began, 3), "sessions_closed": left}
            self.recent_moves.append(entry)
            self._info.update(moves=list(self.recent_moves), moves_total=self.moves)
            log.info("moved to blocks %d:%d in %.1f s (%d sessions closed, to be replayed by their clients)", start,
                     end, entry["seconds"], left)
        self.state = "online"
        self._publish()

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
        with self._swap_lock:  # a move that loads meanwhile finds the server stopped and frees what it loaded
            if self._stopped.is_set():
                return
            self._stopped.set()
            handler, engine, adapters = self.handler, self._engine, self.adapters
        if handler is not None:
            handler.accepting = False
        if self.discovery is not None:  # tell the swarm first, so clients stop routing here
            offline = self.record("offline") if self.blocks is not None and self._meta is not None else None
            self.discovery.stop(offline=offline)
        if self._balancer is not None and self._balancer is not threading.current_thread():
            self._balancer.join(1.0)  # a move in progress sees the stop at its next step
        if engine is not None:
            engine.stop(self.config.drain_timeout)
        if self._rpc is not None:
            time.sleep(0.05)  # let the I/O thread flush replies of the last tasks
            self._rpc.stop()
        self._relay.close()
        if adapters is not None:
            adapters.close()
        if handler is not None:
            handler.close_all()
        if self.metrics is not None:
            self.metrics.stop()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _note_small_saving(family: Any, model_config: Any, quant: str) -> None:
    """Warn when quantizing leaves most of a block's bytes as they are: only `nn.Linear` layers are quantized, so a
    block whose weights are mostly elsewhere (fused experts, 3-D tensors) keeps them in its dtype."""
    if quant == "none":
        return
    full = block_cost(family, model_config, model_config.dtype).weights
    kept = block_cost(family, model_config, model_config.dtype, quant).weights
    if kept > 0.6 * full:
        log.warning("--quant %s keeps %.0f%% of this model's block weights: only linear layers are quantized, and most "
                    "of its weights are elsewhere (fused expert tensors, for one)", quant, 100 * kept / full)


def _close(handler: Handler | None, engine: Engine | None, adapters: AdapterStore | None, timeout: float) -> None:
    """Free a span that no longer serves: its engine (what it still runs is answered), sessions and adapters."""
    if handler is not None:
        handler.accepting = False
    if engine is not None:
        engine.stop(timeout)
    if handler is not None:
        handler.close_all()
    if adapters is not None:
        adapters.close()


__all__ = ["Server", "ServerConfig", "parse_blocks"]
