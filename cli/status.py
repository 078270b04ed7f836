"""`swarm status [MODEL]`: the servers of the swarm and, per model, which blocks are covered and how well."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from ..core.aliases import matches
from ..core.coverage import ModelCoverage, model_coverage, models_served
from ..transport.errors import SwarmError
from ..transport.records import ServerRecord, record_to_wire
from .common import (
    InitialPeersOption,
    LogLevelOption,
    MdnsInterfaceOption,
    MdnsOption,
    SwarmKeyOption,
    UsageError,
    err_console,
    listener,
    load_swarm_key,
    model_and_peers,
    searched,
    setup_logging,
)

if TYPE_CHECKING:
    from ..transport.discovery import Discovery

STATE_STYLE = {"online": "green", "joining": "cyan", "draining": "yellow", "offline": "red"}


def _ago(seconds: float | None) -> str:
    return "now" if seconds is None or seconds < 1 else f"{seconds:.0f} s ago"


def _batch(record: ServerRecord) -> str:
    """Sessions and tokens per pass, recent mean ("-" before the first pass)."""
    if not record.batch_tokens:
        return "-"
    return f"{record.batch_sessions:g} sess, {record.batch_tokens:g} tok"


def _adapters(record: ServerRecord, shown: int = 4) -> str:
    """The adapters a server holds or can load: the first few names, and how many more."""
    names = list(record.adapters)
    if not names:
        return "-"
    more = f" +{len(names) - shown}" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def servers_table(records: list[ServerRecord], discovery: Discovery) -> Table:
    table = Table(title="servers", title_justify="left", expand=False)
    numbers = ("tokens/s", "free cache", "queue", "batch")
    for column in ("peer", "address", "model", "blocks", "state", *numbers, "dtype", "adapters", "version",
                   "last seen"):
        # addresses and model names are never cut short: folded in a narrow terminal, whole elsewhere (print_wide)
        table.add_column(column, justify="right" if column in numbers else "left",
                         overflow="fold" if column in ("address", "model") else "ellipsis")
    for r in sorted(records, key=lambda r: (r.model, r.start, r.end, r.peer_id)):
        table.add_row(r.peer_id[:8], r.addresses[0], r.model, f"{r.start}:{r.end}",
                      Text(r.state, style=STATE_STYLE.get(r.state, "")), f"{r.throughput:,.0f}",
                      f"{r.cache_tokens_free:,}/{r.cache_tokens_total:,}", f"{r.queue:,}", _batch(r), r.dtype,
                      _adapters(r), r.version,
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
        return Group(Text("no servers found yet (try --initial-peers tcp://HOST:PORT)", style="yellow"))
    return Group(servers_table(records, discovery), *(coverage_view(c) for c in coverages))


def print_wide(renderable: RenderableType) -> None:
    """Print on stderr; when it is not a terminal (a pipe, a log), as wide as the content needs, so that no address
    or model name is folded over lines."""
    console = err_console
    if not console.is_terminal:
        unbounded = console.options.update(max_width=1 << 16)
        width = Measurement.get(console, unbounded, renderable).maximum
        if width > console.width:
            console = Console(stderr=True, width=width)  # print() caps its width at the console's
    console.print(renderable)


def status(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Argument(help="Show only this model (id, alias or directory).")] = None,
    initial_peers: InitialPeersOption = None,
    mdns: MdnsOption = None,
    mdns_interface: MdnsInterfaceOption = None,
    swarm_key: SwarmKeyOption = None,
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
    key = load_swarm_key(swarm_key)
    with listener(peers, mdns, mdns_interface, key) as discovery:
        discovery.listen(wait)
        if json_ or not watch:
            records, coverages = snapshot(discovery, model)
            if not records:
                of = f" of {model!r}" if model is not None else ""
                raise SwarmError(f"found no server{of} ({searched(peers, mdns, mdns_interface, wait, discovery)})")
            if json_:
                print(json.dumps(as_json(records, coverages, discovery), indent=2))
            else:
                print_wide(render(records, coverages, discovery))
            return
        from rich.live import Live

        with Live(render(*snapshot(discovery, model), discovery), console=err_console, refresh_per_second=2) as live:
            while True:
                discovery.listen(1.0)
                live.update(render(*snapshot(discovery, model), discovery))


__all__ = ["status"]
