"""`swarm status [MODEL]`: the servers of the swarm and, per model, which blocks are covered and how well."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..core.aliases import matches
from ..core.coverage import ModelCoverage, model_coverage, models_served
from ..transport.discovery import Discovery
from ..transport.records import ServerRecord, record_to_wire
from .common import (
    InitialPeersOption,
    LogLevelOption,
    MdnsInterfaceOption,
    MdnsOption,
    UsageError,
    err_console,
    listener,
    model_and_peers,
    setup_logging,
)

STATE_STYLE = {"online": "green", "joining": "cyan", "draining": "yellow", "offline": "red"}


def _ago(seconds: float | None) -> str:
    return "now" if seconds is None or seconds < 1 else f"{seconds:.0f} s ago"


def servers_table(records: list[ServerRecord], discovery: Discovery) -> Table:
    table = Table(title="servers", title_justify="left", expand=False)
    for column in ("peer", "address", "model", "blocks", "state", "tokens/s", "free cache", "dtype", "version",
                   "last seen"):
        table.add_column(column, justify="right" if column in ("tokens/s", "free cache") else "left")
    for r in sorted(records, key=lambda r: (r.model, r.start, r.end, r.peer_id)):
        table.add_row(r.peer_id[:8], r.addresses[0], r.model, f"{r.start}:{r.end}",
                      Text(r.state, style=STATE_STYLE.get(r.state, "")), f"{r.throughput:,.0f}",
                      f"{r.cache_tokens_free:,}/{r.cache_tokens_total:,}", r.dtype, r.version,
                      _ago(discovery.membership.last_heard(r.peer_id)))
    return table


def coverage_view(coverage: ModelCoverage) -> Group:
    """One cell per block: red '·' no server, yellow '▄' one server, green '█' several."""
    cells = Text()
    for b in coverage.blocks:
        if b.servers == 0:
            cells.append("·", style="bold red")
        elif b.servers == 1:
            cells.append("▄", style="yellow")
        else:
            cells.append("█", style="green")
    missing = ", ".join(f"{a}:{b}" for a, b in coverage.missing)
    summary = Text(f"{coverage.model}: {coverage.num_blocks} blocks, ")
    if missing:
        summary.append(f"no server for blocks {missing}", style="bold red")
    else:
        summary.append("all blocks served", style="green")
    summary.append(f"; bottleneck {coverage.bottleneck:,.0f} tokens/s at block {coverage.weakest}")
    legend = Text("  · none  ▄ one server  █ several", style="dim")
    return Group(summary, Text("  ") + cells, legend)


def snapshot(discovery: Discovery, model: str | None) -> tuple[list[ServerRecord], list[ModelCoverage]]:
    records = discovery.records(lambda r: model is None or matches(model, r.model), include_offline=True)
    models = models_served(records)
    return records, [model_coverage(m, records) for m in models]


def as_json(records: list[ServerRecord], coverages: list[ModelCoverage], discovery: Discovery) -> dict[str, Any]:
    servers = []
    for r in records:
        item = record_to_wire(r)
        item["last_seen_s"] = discovery.membership.last_heard(r.peer_id)
        servers.append(item)
    models = [{"model": c.model, "num_blocks": c.num_blocks, "complete": c.complete,
               "missing": [list(m) for m in c.missing], "bottleneck_tokens_per_s": c.bottleneck,
               "servers_per_block": [b.servers for b in c.blocks]} for c in coverages]
    return {"servers": servers, "models": models}


def render(records: list[ServerRecord], coverages: list[ModelCoverage], discovery: Discovery) -> Group:
    if not records:
        return Group(Text("no servers found (try --initial-peers tcp://HOST:PORT, or a longer --wait)",
                          style="yellow"))
    return Group(servers_table(records, discovery), *(coverage_view(c) for c in coverages))


def status(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Argument(help="Show only this model (id, alias or directory).")] = None,
    initial_peers: InitialPeersOption = None,
    mdns: MdnsOption = None,
    mdns_interface: MdnsInterfaceOption = None,
    wait: Annotated[float, typer.Option(help="Seconds to listen before showing the swarm.")] = 2.0,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of tables.")] = False,
    watch: Annotated[bool, typer.Option(help="Refresh the view live until Ctrl-C.")] = False,
    log_level: LogLevelOption = None,
) -> None:
    """What the swarm serves, and how well."""
    setup_logging(log_level, default="WARNING")
    model, peers = model_and_peers(model, initial_peers, list(ctx.args))
    if wait < 0:
        raise UsageError("--wait must be 0 or more")
    with listener(peers, mdns, mdns_interface) as discovery:
        discovery.listen(wait)
        if json_:
            print(json.dumps(as_json(*snapshot(discovery, model), discovery), indent=2))
            return
        if not watch:
            err_console.print(render(*snapshot(discovery, model), discovery))
            return
        with Live(render(*snapshot(discovery, model), discovery), console=err_console, refresh_per_second=2) as live:
            while True:
                discovery.listen(1.0)
                live.update(render(*snapshot(discovery, model), discovery))


__all__ = ["status"]
