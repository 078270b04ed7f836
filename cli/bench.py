"""`swarm bench [MODEL]`: measure the servers and routes a client of MODEL would use."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from ..core.aliases import matches
from ..core.coverage import models_served
from ..transport.errors import SwarmError
from .common import (
    CompressionOption,
    InitialPeersOption,
    LogLevelOption,
    MdnsInterfaceOption,
    MdnsOption,
    ServerQuantOption,
    SwarmKeyOption,
    UsageError,
    check_compression,
    err_console,
    listener,
    load_swarm_key,
    model_and_peers,
    parse_server_quant,
    searched,
    setup_logging,
)


def bench(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Argument(help="Model to measure (default: the one the swarm serves).")] = None,
    initial_peers: InitialPeersOption = None,
    mdns: MdnsOption = None,
    mdns_interface: MdnsInterfaceOption = None,
    swarm_key: SwarmKeyOption = None,
    wait: Annotated[float, typer.Option(help="Seconds to listen for servers first.")] = 2.0,
    steps: Annotated[int, typer.Option(help="Inference steps timed per server and per route.")] = 20,
    batch: Annotated[int, typer.Option(help="Batch size of the forward measurement.")] = 8,
    length: Annotated[int, typer.Option(help="Sequence length of the forward measurement.")] = 128,
    all_routes: Annotated[bool, typer.Option(help="Also measure every alternative route.")] = False,
    server_quant: ServerQuantOption = None,
    compression: CompressionOption = "auto",
    json_: Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of tables.")] = False,
    log_level: LogLevelOption = None,
) -> None:
    """Measure pings, per-server step latency, and steps/s and tokens/s through the routes a client would use."""
    setup_logging(log_level, default="WARNING")
    check_compression(compression)
    model, peers = model_and_peers(model, initial_peers, list(ctx.args))
    if steps < 1 or batch < 1 or length < 1 or wait < 0:
        raise UsageError("--steps, --batch and --length must be at least 1 and --wait 0 or more")
    allowed = parse_server_quant(server_quant)
    from ..core.bench import Bench, as_dicts

    key = load_swarm_key(swarm_key)
    with listener(peers, mdns, mdns_interface, key) as discovery:
        discovery.listen(wait)
        records = [r for r in discovery.records() if r.state == "online" and (allowed is None or r.quant in allowed)]
    if model is None:
        served = models_served(records)
        if len(served) > 1:
            raise UsageError(f"several models are served ({'; '.join(served)}); name one: swarm bench MODEL")
        if not served:
            raise SwarmError(f"found no server ({searched(peers, mdns, mdns_interface, wait, discovery)})")
        model = served[0]
    records = [r for r in records if matches(model, r.model)]
    if not records:
        raise SwarmError(f"found no server of {model!r} ({searched(peers, mdns, mdns_interface, wait, discovery)})")
    runner = Bench(records, swarm_key=key, compression=compression)
    try:
        with err_console.status(f"measuring {len(records)} servers of {records[0].model}..."):
            servers = runner.servers(steps)
            routes = runner.routes(steps, batch, length, all_routes)
    finally:
        runner.close()
    if json_:
        print(json.dumps({"model": records[0].model, "servers": as_dicts(servers), "routes": as_dicts(routes),
                          "batch": batch, "length": length, "steps": steps, "compression": compression},
                         indent=2))
        return
    table = Table(title=f"servers of {records[0].model}", title_justify="left")
    for column in ("server", "blocks", "ping ms", "step ms"):
        table.add_column(column, justify="left" if column in ("server", "blocks") else "right")
    for s in servers:
        table.add_row(s.peer, s.blocks, _num(s.ping_ms, 2), _num(s.step_ms, 2) if s.error is None else s.error)
    err_console.print(table)
    table = Table(title=f"routes (inference at batch 1; forward at {batch}x{length} tokens)", title_justify="left")
    for column in ("route", "steps/s", "step ms", "forward tokens/s"):
        table.add_column(column, justify="left" if column == "route" else "right")
    for r in routes:
        name = ("* " if r.chosen else "  ") + " -> ".join(r.route)
        table.add_row(name, _num(r.steps_per_s, 1), _num(r.step_ms, 2), _num(r.forward_tokens_per_s, 0))
    err_console.print(table)
    err_console.print("[dim]* the route a client would take now[/]")


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"
