"""`swarm serve MODEL [--blocks START:END | --num-blocks N]`: serve a span of transformer blocks until SIGTERM or
Ctrl-C. Without --blocks the server chooses its span (as many blocks as fit in --max-memory, or N) where the swarm
needs it most and moves when the swarm changes (core/server/server.py); --blocks places it by hand, for good."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Annotated

import typer

from ..transport.errors import ConfigError
from .common import (
    EXIT_INTERRUPTED,
    InitialPeersOption,
    LogLevelOption,
    MdnsInterfaceOption,
    MdnsOption,
    UsageError,
    collect_peers,
    err_console,
    setup_logging,
)

log = logging.getLogger("swarm.cli.serve")


def serve(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Hugging Face model id or local model directory.")],
    blocks: Annotated[str | None, typer.Option(
        "--blocks", help="Blocks to serve, START:END (half-open, 0-based); the server never moves. Default: it "
                         "chooses the blocks the swarm needs most, and moves when the swarm changes.")] = None,
    num_blocks: Annotated[int | None, typer.Option(
        help="Without --blocks: how many blocks to hold (default: as many as fit in --max-memory).")] = None,
    max_memory: Annotated[str | None, typer.Option(
        help="Memory the blocks and their attention cache may take, e.g. 4GiB or 512MiB (default: half the "
             "available RAM).")] = None,
    throughput: Annotated[str, typer.Option(
        help="Throughput to announce: auto (measured once per model, dtype and device, then cached), eval (measure "
             "again), or a number of tokens/s.")] = "auto",
    bandwidth: Annotated[float, typer.Option(
        help="Mbit/s of this server's link to the others (the announced throughput is at most what it carries).")
    ] = 100.0,
    rebalance: Annotated[bool, typer.Option(
        help="Without --blocks: move to other blocks when the swarm needs it (--no-rebalance: stay where chosen).")
    ] = True,
    balance_period: Annotated[float, typer.Option(help="Seconds between balance checks (jittered).")] = 60.0,
    balance_quality: Annotated[float, typer.Option(
        help="Move only when the swarm's bottleneck throughput is below this share of what the move reaches, "
             "in (0, 1].")] = 0.9,
    min_move_interval: Annotated[float, typer.Option(help="Seconds at least between two moves.")] = 300.0,
    move_drain: Annotated[float, typer.Option(
        help="Seconds running sessions get to finish when the server moves (then they are closed and their clients "
             "replay them elsewhere).")] = 30.0,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port to listen on; 0 picks a free one (printed on stdout).")] = 0,
    dtype: Annotated[str, typer.Option(
        help="Weights and compute dtype: auto (the checkpoint's on a CPU, bfloat16 or float16 on a GPU), float32, "
             "bfloat16, float16.")] = "auto",
    device: Annotated[str, typer.Option(
        help="Where the blocks, their caches and computations are: auto (the first CUDA GPU when there is one, else "
             "the CPU), cpu, cuda, cuda:N or mps.")] = "auto",
    quant: Annotated[str, typer.Option(
        help="Weight quantization of the blocks' linear layers: none, int8 (LLM.int8, about half the bytes of "
             "16-bit weights), nf4 (4-bit NormalFloat, about a quarter), or auto: the least of these with which the "
             "blocks asked for (--blocks, --num-blocks, else the whole model) fit in --max-memory (default: half the "
             "available RAM).")] = "none",
    cache_tokens: Annotated[int, typer.Option(
        help="Attention-cache budget in tokens (batch x max length), shared by all sessions.")] = 8192,
    session_timeout: Annotated[float, typer.Option(help="Seconds before an idle session is closed.")] = 600.0,
    initial_peers: InitialPeersOption = None,
    mdns: MdnsOption = None,
    mdns_interface: MdnsInterfaceOption = None,
    model_id: Annotated[str | None, typer.Option(help="Model id to announce (default: the hub id, or the "
                                                 "directory's name).")] = None,
    gossip_period: Annotated[float, typer.Option(help="Seconds between gossip rounds.")] = 1.0,
    record_ttl: Annotated[float, typer.Option(help="Seconds others keep this server's record without news.")] = 15.0,
    simulate_rtt_ms: Annotated[float, typer.Option(help="Benchmarks: add this round trip (ms) to this server's "
                                                   "links to other servers.")] = 0.0,
    pass_tokens: Annotated[int, typer.Option(
        help="New tokens one pass through the blocks may hold, all requests together (longer prompts are chunked "
             "over several passes).")] = 512,
    batching: Annotated[bool, typer.Option(
        help="Run the requests of many sessions in one pass (--no-batching: one request at a time, whole).")] = True,
    adapters: Annotated[list[str] | None, typer.Option(
        "--adapters", help="PEFT adapters (LoRA, IA3) to serve: local directories or hub ids, several after one "
                           "--adapters; each is chosen by its directory's name or its hub id.")] = None,
    adapter_dir: Annotated[str | None, typer.Option(
        help="Also serve the adapters in this directory (DIR/NAME), each loaded on its first request.")] = None,
    max_adapters: Annotated[int, typer.Option(help="Adapters held in memory at once (the least recently used one "
                                              "not in use is dropped).")] = 16,
    adapter_memory: Annotated[int, typer.Option(help="MiB all held adapters may take together.")] = 1024,
    mix_adapters: Annotated[bool, typer.Option(
        help="Requests of different adapters share a pass (--no-mix-adapters: one adapter per pass, a baseline for "
             "benchmarks).")] = True,
    identity: Annotated[str | None, typer.Option(
        help="File of this server's key pair, made on first start: its public key is the server's peer id, stable "
             "across restarts, and signs its records (default: a new key pair each start).")] = None,
    swarm_key: Annotated[str | None, typer.Option(
        help="Serve a private swarm with this swarm key (`swarm keygen`): every connection is encrypted, and only "
             "peers holding the swarm key or a key in --allowed-keys get in.")] = None,
    allowed_keys: Annotated[str | None, typer.Option(
        help="Directory of member keys (`swarm keygen --member`, their .pub files) admitted besides the swarm key; "
             "read again when it changes.")] = None,
    peer_sessions: Annotated[int, typer.Option(
        help="Sessions one peer (a client's address, key, or loopback connection) may hold open at once.")] = 128,
    peer_share: Annotated[float, typer.Option(
        help="What one peer may hold of the cache budget and of the request queue (0..1], so that others find "
             "room; a peer may always hold 4096 cache tokens when the budget has them.")] = 0.5,
    metrics_port: Annotated[int | None, typer.Option(
        help="Serve Prometheus metrics at http://METRICS_HOST:PORT/metrics (0 picks a free port, shown when "
             "serving). Default: no metrics, no port opened.")] = None,
    metrics_host: Annotated[str, typer.Option(help="Interface the metrics listen on.")] = "127.0.0.1",
    log_level: LogLevelOption = None,
) -> None:
    """Serve a span of transformer blocks of MODEL to the swarm."""
    setup_logging(log_level)
    from ..core.server import Server, ServerConfig, parse_blocks
    from ..core.server.engine import QueueLimits
    from ..core.server.handler import HandlerLimits
    from ..core.server.placement import BalanceSettings, parse_memory, parse_quant, parse_throughput
    from ..core.server.scheduler import PassLimits
    from ..core.server.throughput import cache_path
    from ..transport.discovery import DiscoveryConfig
    from ..transport.gossip import GossipConfig
    from ..transport.mdns import MdnsSettings
    from ..transport.rpc import normalize_endpoint

    try:
        span = None if blocks is None else parse_blocks(blocks)
        memory = None if max_memory is None else parse_memory(max_memory)
        throughput_mode = parse_throughput(throughput)
        quant_mode = parse_quant(quant)
        balance = BalanceSettings(rebalance=rebalance, period=balance_period, quality=balance_quality,
                                  min_interval=min_move_interval, drain=move_drain)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    if span is not None and num_blocks is not None:
        raise UsageError("--blocks and --num-blocks do not go together: --blocks says which blocks, --num-blocks "
                         "how many to choose")
    if num_blocks is not None and num_blocks < 1:
        raise UsageError(f"--num-blocks must be at least 1, got {num_blocks}")
    if not bandwidth > 0:
        raise UsageError(f"--bandwidth must be a positive number of Mbit/s, got {bandwidth}")
    if not 0 <= port < 65536:
        raise UsageError(f"--port must be in 0..65535, got {port}")
    if metrics_port is not None and not 0 <= metrics_port < 65536:
        raise UsageError(f"--metrics-port must be in 0..65535, got {metrics_port}")
    if cache_tokens < 0:
        raise UsageError("--cache-tokens must be 0 or more")
    if session_timeout <= 0:
        raise UsageError("--session-timeout must be positive")
    if pass_tokens < 1:
        raise UsageError("--pass-tokens must be at least 1")
    if peer_sessions < 1 or not 0 < peer_share <= 1:
        raise UsageError("--peer-sessions must be at least 1 and --peer-share in (0, 1]")
    if max_adapters < 0 or adapter_memory < 0:
        raise UsageError("--max-adapters and --adapter-memory must be 0 or more")
    from ..core.server.adapters import AdapterConfig

    adapter_config = AdapterConfig(preload=tuple(adapters or ()), directory=adapter_dir, max_adapters=max_adapters,
                                   max_bytes=adapter_memory << 20)
    peers = [normalize_endpoint(p) for p in collect_peers(initial_peers, ctx.args)]
    if gossip_period <= 0 or record_ttl <= gossip_period:
        raise UsageError("--gossip-period must be positive and --record-ttl longer than it")
    discovery = DiscoveryConfig(mdns=MdnsSettings.from_options(mdns, mdns_interface),
                                gossip=GossipConfig(period=gossip_period, suspect_after=3 * gossip_period),
                                record_ttl=record_ttl)
    config = ServerConfig(model=model, blocks=span, host=host, port=port, dtype=dtype, device=device,
                          quant=quant_mode,
                          cache_tokens=cache_tokens,
                          limits=HandlerLimits(session_timeout=session_timeout, max_peer_sessions=peer_sessions,
                                               peer_share=peer_share),
                          queue=QueueLimits(client_share=peer_share), initial_peers=peers,
                          discovery=discovery, model_id=model_id, link_delay=max(0.0, simulate_rtt_ms) / 2000,
                          passes=PassLimits(max_tokens=pass_tokens, mix_tasks=mix_adapters), batching=batching,
                          adapters=adapter_config, identity=identity, swarm_key=swarm_key,
                          allowed_keys=allowed_keys, num_blocks=num_blocks, max_memory=memory,
                          throughput=throughput_mode, throughput_cache=str(cache_path()), bandwidth=bandwidth,
                          balance=balance, metrics_port=metrics_port, metrics_host=metrics_host)
    server = Server(config)
    total = server.num_blocks()  # reads the model's config only
    if span is not None and span[1] > total:
        raise UsageError(f"--blocks {span[0]}:{span[1]} is outside the model's {total} blocks (0:{total})")
    if num_blocks is not None and num_blocks > total:
        raise UsageError(f"--num-blocks {num_blocks} is more than the model's {total} blocks")
    stop = threading.Event()
    received: list[int] = []
    starting = True

    def on_signal(signum: int, frame: object) -> None:
        received.append(signum)
        stop.set()
        if starting and len(received) == 1:  # abort the load rather than serve once it is done
            raise _StoppedWhileStarting

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        _follow_parent()
        server.start()
        starting = False
    except _StoppedWhileStarting:
        starting = False
        log.info("stopped before serving")
        server.stop()
        if received[0] == signal.SIGINT:
            sys.exit(EXIT_INTERRUPTED)
        return
    try:
        chosen = server.blocks or (0, 0)
        span_text = f"{chosen[0]}:{chosen[1]}" + ("" if span is not None else " (chosen; moves when the swarm needs)"
                                                  if rebalance else " (chosen)")
        dtype_text = str(server.span.dtype).removeprefix("torch.") if server.span else dtype
        if server.quant != "none":
            dtype_text += f", {server.quant} weights" + (" (auto)" if quant_mode == "auto" else "")
        print(server.endpoint, flush=True)  # data on stdout: the address clients use
        held = server.adapters.preloaded if server.adapters is not None else []
        adapters_text = f", adapters {', '.join(held)}" if held else ""
        if adapter_dir:
            adapters_text += f", adapters from {adapter_dir} on request"
        private = ""
        if server.swarm_key is not None:
            members = f", {len(server.admission.keys)} member keys" if allowed_keys is not None else ""
            private = f", private swarm{members}"
        metrics_text = "" if server.metrics is None else f", metrics at {server.metrics.url}"
        err_console.print(f"[green]serving[/] blocks {span_text} of {server.model_id} at [bold]{server.endpoint}[/] "
                          f"({dtype_text} on {server.device}, cache {cache_tokens} tokens, "
                          f"{server.throughput:,.0f} tokens/s"
                          f"{adapters_text}{private}{metrics_text}); "
                          "Ctrl-C to stop", highlight=False)
        while not stop.wait(0.5):
            pass
    finally:
        log.info("shutting down")
        server.stop()
    if received and received[-1] == signal.SIGINT:
        sys.exit(EXIT_INTERRUPTED)


class _StoppedWhileStarting(Exception):
    """SIGTERM or SIGINT arrived while the server was still loading."""


def _follow_parent() -> None:
    """When started as a child ($SWARM_PARENT_PID, set by core/local_swarm.py), die with the parent: SIGTERM to
    this process once the parent is gone.

    Linux delivers that signal itself (PR_SET_PDEATHSIG, unless $SWARM_PARENT_DEATHSIG is 0: the kernel ties it to
    the parent's thread that started us, not to its process); and a thread watches for the parent to go (this process
    is then re-parented, so `os.getppid()` changes), on any POSIX system.
    """
    text = os.environ.pop("SWARM_PARENT_PID", "")
    deathsig = os.environ.pop("SWARM_PARENT_DEATHSIG", "1") != "0"
    if not text.isdigit():
        return
    parent = int(text)
    if deathsig and sys.platform.startswith("linux"):
        _parent_death_signal(signal.SIGTERM)

    def watch() -> None:  # also when the parent died before we started watching
        while os.getppid() == parent:
            threading.Event().wait(0.5)
        log.warning("the parent process %d is gone; stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="swarm-parent-watch", daemon=True).start()


def _parent_death_signal(sig: int) -> None:
    """Ask Linux to send `sig` to this process when its parent dies (best effort)."""
    import ctypes

    pr_set_pdeathsig = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(pr_set_pdeathsig, int(sig), 0, 0, 0) != 0:
            log.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError) as e:
        log.debug("prctl(PR_SET_PDEATHSIG) unavailable: %s", e)
