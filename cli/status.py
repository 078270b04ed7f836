"""`swarm status [MODEL]`: the servers of the swarm and, per model, which blocks are covered, how well, and how well
the servers are arranged.

What it shows, from one snapshot of what discovery learned (the same for the table, `--json` and `--watch`):

* each server's record, its **age** (seconds since its owner published it, see `coverage.record_age`: our own clock
  once we saw its seq advance, its owner's clock before that) and whether it is **suspected**: still believed (its ttl
  has not run out) but silent for longer than the gossip's `suspect_after`, i.e. probably dead without saying so;
* per model, the **total throughput of every block** (the servers holding it, summed as the balancer counts them:
  `balance.block_throughputs`), drawn as a strip of one character per block (or per group of blocks when they do not
  fit the terminal, showing each group's minimum), the **bottleneck** (least-served blocks and their throughput) and
  the **balance quality**: the bottleneck now over the bottleneck moving servers could reach (`balance_quality`, 1.0
  when no move would help). Suspected servers are left out of these figures, as the balancer would leave them out;
* **recent moves**: servers seen serving another span than at the previous look (while the command listens or
  watches), and each record's own `moves` counter when its server announces one.

Data goes to stdout only with `--json` (one object; with `--watch`, one object per line per refresh); tables go to
stderr. `--web` serves the same view as a live web page instead (`web.py`), and prints its address on stdout.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from ..core.aliases import matches
from ..core.coverage import (
    SERVING_STATES,
    Age,
    ModelCoverage,
    Move,
    MoveLog,
    is_suspected,
    model_coverage,
    models_served,
    record_age,
    strip_cells,
    weakest_blocks,
)
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
    from ..transport.gossip import Heard
    from .web import WebConfig

STATE_STYLE = {"online": "green", "joining": "cyan", "draining": "yellow", "offline": "red", "suspected": "magenta"}
SHADES = "▁▂▃▄▅▆▇█"  # a block's throughput against the strongest block's
INDENT = "  "
MOVES_SHOWN = 8  # recent moves kept and shown


# -- the snapshot ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerView:
    """A record as status shows it."""

    record: ServerRecord
    age: Age
    suspected: bool
    moves: int | None  # the record's own move counter (None when its server announces none)

    @property
    def state(self) -> str:
        return "suspected" if self.suspected else self.record.state


@dataclass(frozen=True)
class ModelView:
    coverage: ModelCoverage  # servers per block and gaps (unsigned records included, suspected ones not)
    throughputs: tuple[float, ...]  # total throughput per block, as the balancer counts it
    bottleneck: float  # the least of them
    weakest: tuple[tuple[int, int], ...]  # the blocks at the bottleneck, as half-open ranges
    quality: float | None  # bottleneck now / what moving servers could reach; None when no server counts
    suspected: int  # suspected servers of this model, left out of the figures above
    unsigned: int = 0  # serving records without a valid signature: they serve, but the balancer does not count them

    @property
    def reachable(self) -> float | None:
        """The bottleneck the balancer could reach by moving servers (None when unknown)."""
        if self.quality is None or self.quality <= 0:
            return None
        return self.bottleneck / self.quality


@dataclass(frozen=True)
class Snapshot:
    servers: tuple[ServerView, ...]
    models: tuple[ModelView, ...]
    moves: tuple[Move, ...]  # newest first
    at: float  # wall-clock time it was taken


@lru_cache(maxsize=16)
def _quality(loads: tuple[Any, ...], num_blocks: int) -> float:
    """`balance_quality`, remembered: it searches placements (seconds for a thousand servers), and a watched swarm's
    servers keep their spans and throughputs between most refreshes."""
    from ..core import balance

    return balance.balance_quality(loads, num_blocks)


def model_view(model: str, records: list[ServerRecord], suspected: list[ServerRecord]) -> ModelView:
    """The figures of one model over `records`; `suspected` records count for the model's size, nothing else."""
    from ..core import balance  # numpy and signature checks: not at import time, --help stays fast

    coverage = model_coverage(model, [*records, *(replace(r, state="offline") for r in suspected)])
    loads = balance.servers_from_records(records, model)
    raw = balance.block_throughputs(loads, coverage.num_blocks)
    # sums of floats leave ~1e-12 where servers' throughputs cancel out (a block nobody holds): that is a 0
    floor = 1e-9 * max(raw, default=0.0)
    throughputs = tuple(t if t > floor else 0.0 for t in raw)
    quality = _quality(tuple(loads), coverage.num_blocks) if loads else None
    if quality is not None and quality < 1 and min(throughputs, default=0.0) == 0:
        quality = 0.0  # the same rounding, seen through the quality: a block without a server is a bottleneck of 0
    counted = {s.peer_id for s in loads}
    unsigned = sum(r.model == model and r.state in SERVING_STATES and r.peer_id not in counted for r in records)
    return ModelView(coverage, throughputs, min(throughputs, default=0.0), tuple(weakest_blocks(throughputs)),
                     quality, sum(r.model == model for r in suspected), unsigned)


def build_snapshot(records: list[ServerRecord], heard: Callable[[str], Heard | None], suspect_after: float,
                   wall_now: float, moves: MoveLog | None = None) -> Snapshot:
    """The snapshot of `records`, given what our membership table saw of each (`heard(peer_id)`); pure."""
    servers = []
    for r in sorted(records, key=lambda r: (r.model, r.start, r.end, r.peer_id)):
        age = record_age(r, heard(r.peer_id), wall_now)
        counter = getattr(r, "moves", None)  # a field newer servers announce
        servers.append(ServerView(r, age, is_suspected(r, age, suspect_after),
                                  counter if isinstance(counter, int) else None))
    trusted = [s.record for s in servers if not s.suspected]
    suspected = [s.record for s in servers if s.suspected]
    models = tuple(model_view(m, trusted, suspected) for m in models_served([s.record for s in servers]))
    if moves is not None:
        moves.observe(records, wall_now)
    return Snapshot(tuple(servers), models, tuple(moves.moves if moves is not None else ()), wall_now)


def take_snapshot(discovery: Discovery, model: str | None, moves: MoveLog | None = None) -> Snapshot:
    """What discovery knows now (records of `model` only, when given); `moves` notes the spans seen."""
    membership = discovery.membership
    return build_snapshot(_records(discovery, model), membership.heard, membership.config.suspect_after, time.time(),
                          moves)


def _records(discovery: Discovery, model: str | None) -> list[ServerRecord]:
    return discovery.records(lambda r: model is None or matches(model, r.model), include_offline=True)


def gather(discovery: Discovery, model: str | None, seconds: float, moves: MoveLog, step: float = 0.5) -> None:
    """Listen for `seconds`, looking at the spans every `step` so that moves made meanwhile are noted (only the
    spans: the figures are computed once, by the snapshot that follows)."""
    deadline = time.monotonic() + seconds
    moves.observe(_records(discovery, model), time.time())
    while (left := deadline - time.monotonic()) > 0:
        discovery.listen(min(step, left))
        moves.observe(_records(discovery, model), time.time())


# -- JSON -------------------------------------------------------------------------------------------------------------


def _span(span: tuple[int, int]) -> list[int]:
    return [span[0], span[1]]


def as_json(snap: Snapshot) -> dict[str, Any]:
    """Stable keys: every record field, plus what status adds (documented in the README)."""
    servers = []
    for s in snap.servers:
        item = record_to_wire(s.record)
        item.update(age_s=round(s.age.seconds, 3), age_source=s.age.source, suspected=s.suspected,
                    shown_state=s.state, moves=s.moves)
        item["last_seen_s"] = item["age_s"]  # its name before: the record's age (it was our listening time)
        servers.append(item)
    models = []
    for m in snap.models:
        c = m.coverage
        models.append({
            "model": c.model, "num_blocks": c.num_blocks, "complete": c.complete,
            "missing": [_span(g) for g in c.missing], "servers_per_block": [b.servers for b in c.blocks],
            "throughput_per_block": [round(t, 3) for t in m.throughputs],
            "bottleneck_tokens_per_s": m.bottleneck, "bottleneck_blocks": [_span(w) for w in m.weakest],
            "balance_quality": m.quality, "reachable_bottleneck_tokens_per_s": m.reachable,
            "suspected_servers": m.suspected, "unsigned_servers": m.unsigned,
        })
    moves = [{"peer_id": mv.peer_id, "model": mv.model, "from": _span(mv.before), "to": _span(mv.after),
              "at": mv.at, "ago_s": round(max(0.0, snap.at - mv.at), 3)} for mv in snap.moves]
    return {"servers": servers, "models": models, "moves": moves, "at": snap.at}


# -- tables and strips -----------------------------------------------------------------------------------------------


def _age(age: Age) -> str:
    return "now" if age.seconds < 1 else f"{age.seconds:.0f} s"


def _batch(record: ServerRecord) -> str:
    """Sessions and tokens per pass, recent mean ("-" before the first pass)."""
    if not record.batch_tokens:
        return "-"
    return f"{record.batch_sessions:g} sess, {record.batch_tokens:g} tok"


def _dtype(record: ServerRecord) -> str:
    """Its dtype (with its weight quantization, when it has one: float32+nf4), and its device when that is not the
    CPU."""
    dtype = record.dtype if record.quant == "none" else f"{record.dtype}+{record.quant}"
    return dtype if record.device == "cpu" else f"{dtype} {record.device}"


def _adapters(record: ServerRecord, shown: int = 4) -> str:
    """The adapters a server holds or can load: the first few names, and how many more."""
    names = list(record.adapters)
    if not names:
        return "-"
    more = f" +{len(names) - shown}" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


COLUMNS = ("peer", "address", "model", "blocks", "state", "tokens/s", "free cache", "queue", "batch", "dtype",
           "adapters", "version", "moves", "age")
NUMBERS = ("tokens/s", "free cache", "queue", "batch", "moves", "age")
# columns a narrow terminal hides, first to last (peer, blocks, state and age always stay; --json has everything)
DROPPED_FIRST = ("adapters", "version", "dtype", "batch", "queue", "free cache", "model", "address", "moves",
                 "tokens/s")


def _cells(s: ServerView) -> dict[str, str | Text]:
    r = s.record
    age = Text(_age(s.age), style="magenta" if s.suspected else "")
    if s.age.source == "clock" and s.age.seconds >= 1:
        age.append("*", style="dim")  # by the owner's clock: we have not seen it advance yet
    return {"peer": r.peer_id[:8], "address": r.addresses[0], "model": r.model, "blocks": f"{r.start}:{r.end}",
            "state": Text(s.state, style=STATE_STYLE.get(s.state, "")), "tokens/s": f"{r.throughput:,.0f}",
            "free cache": f"{r.cache_tokens_free:,}/{r.cache_tokens_total:,}", "queue": f"{r.queue:,}",
            "batch": _batch(r), "dtype": _dtype(r), "adapters": _adapters(r), "version": r.version,
            "moves": "-" if s.moves is None else f"{s.moves:,}", "age": age}


def servers_table(servers: tuple[ServerView, ...], hidden: frozenset[str] = frozenset(),
                  rows: list[dict[str, str | Text]] | None = None) -> Table:
    table = Table(title="servers", title_justify="left", expand=False)
    shown = [c for c in COLUMNS if c not in hidden]
    for column in shown:
        # addresses and model names are never cut short: folded in a narrow terminal, whole elsewhere (print_wide)
        table.add_column(column, justify="right" if column in NUMBERS else "left",
                         overflow="fold" if column in ("address", "model") else "ellipsis")
    for cells in rows if rows is not None else map(_cells, servers):
        table.add_row(*(cells[c] for c in shown))
    return table


class ServersTable:
    """The servers table with as many columns as fit the width it is given, whole: the less useful ones are hidden
    first (and said so) rather than every column being squeezed into ellipses."""

    def __init__(self, servers: tuple[ServerView, ...]):
        self.servers = servers
        self.rows = [_cells(s) for s in servers]
        # each column's natural width, measured once (a thousand rows are measured in milliseconds this way)
        self.widths = {c: max([cell_len(c), *(cell_len(r[c].plain if isinstance(r[c], Text) else r[c])
                                               for r in self.rows)]) for c in COLUMNS}

    def width(self, hidden: list[str]) -> int:
        """The table's natural width without the `hidden` columns: cells, one space of padding on each side of a
        cell, and the box's vertical lines."""
        shown = [self.widths[c] for c in COLUMNS if c not in hidden]
        return sum(w + 2 for w in shown) + len(shown) + 1

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        hidden: list[str] = []
        for column in DROPPED_FIRST:
            if self.width(hidden) <= options.max_width:
                break
            hidden.append(column)
        yield servers_table(self.servers, frozenset(hidden), self.rows)
        if any(s.age.source == "clock" and s.age.seconds >= 1 for s in self.servers):
            yield Text("* age by the server's own clock: not seen advancing since we listen", style="dim")
        if hidden:
            yield Text(f"hidden at this width: {', '.join(hidden)} (--json has all)", style="dim")

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(min(self.width(list(DROPPED_FIRST)), options.max_width), self.width([]))


class BlockStrip:
    """Per-block total throughput in one line that fits the width it is given: a bar height per block (against the
    strongest block), coloured by how many servers hold it; bottleneck blocks in bold red, blocks nobody holds '·'.
    When the blocks do not fit, each character stands for a group of consecutive blocks and shows their minimum."""

    def __init__(self, view: ModelView):
        self.view = view

    def lines(self, width: int) -> list[Text]:
        view = self.view
        values = list(view.throughputs)
        if not values:
            return []
        indent = INDENT if len(values) + len(INDENT) <= width else ""  # one character per block first
        cells = strip_cells(values, max(1, width - len(indent)))
        counts = strip_cells([float(b.servers) for b in view.coverage.blocks], max(1, width - len(indent)))
        top = max(values)
        weak = {b for start, end in view.weakest for b in range(start, end)}
        strip = Text(indent)
        for (start, end, value), (_, _, count) in zip(cells, counts, strict=True):
            if count == 0:
                strip.append("·", style="bold red")
                continue
            level = round(value / top * len(SHADES)) - 1 if top > 0 else 0
            shade = SHADES[max(0, min(len(SHADES) - 1, level))]
            low = any(b in weak for b in range(start, end))
            strip.append(shade, style="bold red" if low else ("yellow" if count == 1 else "green"))
        per = cells[1][0] - cells[0][0] if len(cells) > 1 else 1
        last = str(len(values) - 1)
        axis = Text(indent + "0" + last.rjust(len(cells) - 1) if len(cells) > len(last) else indent + "0", style="dim")
        group = f"1 char = {per} blocks (min); " if per > 1 else ""
        legend = Text(f"{indent}{group}top {top:,.0f} tokens/s; · none, yellow 1 server, green 2+, red bottleneck",
                      style="dim")
        return [strip, axis, legend]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from self.lines(options.max_width)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(10, len(INDENT) + max(10, len(self.view.throughputs)))


def model_summary(view: ModelView) -> Group:
    c = view.coverage
    summary = Text(f"{c.model}: {c.num_blocks} blocks, ")
    missing = ", ".join(f"{a}:{b}" for a, b in c.missing)
    if missing:
        summary.append(f"no server for blocks {missing}", style="bold red")
    else:
        summary.append("all blocks served", style="green")
    where = ", ".join(f"{a}" if b == a + 1 else f"{a}:{b}" for a, b in view.weakest[:4])
    more = ", …" if len(view.weakest) > 4 else ""
    lines: list[RenderableType] = [summary, Text(f"{INDENT}bottleneck {view.bottleneck:,.0f} tokens/s at "
                                                 f"block{'s' if c.num_blocks > 1 else ''} {where}{more}")]
    if view.quality is not None:
        quality = Text(f"{INDENT}balance quality {view.quality:.2f}",
                       style="green" if view.quality >= 0.95 else ("yellow" if view.quality >= 0.7 else "red"))
        reachable = view.reachable
        if reachable is not None and view.quality < 0.995:
            quality.append(f" (moving servers could reach {reachable:,.0f} tokens/s)", style="default")
        elif reachable is not None:
            quality.append(" (as good as moving servers can make it)", style="default")
        elif view.quality == 0:
            quality.append(" (some blocks have no server)", style="default")
        lines.append(quality)
    if view.suspected:
        lines.append(Text(f"{INDENT}{view.suspected} suspected server{'s' if view.suspected > 1 else ''} not counted",
                          style="magenta"))
    if view.unsigned:
        lines.append(Text(f"{INDENT}{view.unsigned} unsigned server{'s' if view.unsigned > 1 else ''} (older "
                          "versions) not counted", style="yellow"))
    lines.append(BlockStrip(view))
    return Group(*lines)


def moves_view(moves: tuple[Move, ...], now: float) -> Group:
    lines = [Text("recent moves", style="bold")]
    for mv in moves[:MOVES_SHOWN]:
        ago = max(0.0, now - mv.at)
        lines.append(Text(f"{INDENT}{mv.peer_id[:8]} {mv.model} {mv.before[0]}:{mv.before[1]} → "
                          f"{mv.after[0]}:{mv.after[1]}  {'now' if ago < 1 else f'{ago:.0f} s ago'}"))
    return Group(*lines)


def render(snap: Snapshot, max_rows: int | None = None) -> Group:
    """The whole view; `max_rows` bounds the servers listed (the live view: suspected ones first, the rest in order)."""
    if not snap.servers:
        return Group(Text("no servers found yet (try --initial-peers tcp://HOST:PORT)", style="yellow"))
    servers = snap.servers
    if max_rows is not None and len(servers) > max_rows:
        servers = tuple(sorted(servers, key=lambda s: not s.suspected)[:max_rows])
    parts: list[RenderableType] = [ServersTable(servers)]
    if len(servers) < len(snap.servers):
        parts.append(Text(f"… and {len(snap.servers) - len(servers)} more servers (--json lists them all)",
                          style="dim"))
    parts += [model_summary(m) for m in snap.models]
    if snap.moves:
        parts.append(moves_view(snap.moves, snap.at))
    return Group(*parts)


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


# -- the command ------------------------------------------------------------------------------------------------------


def watch(discovery: Discovery, model: str | None, show: Callable[[Snapshot], None], period: float = 1.0,
          refreshes: int | None = None, moves: MoveLog | None = None) -> None:
    """Listen and `show` a fresh snapshot every `period` seconds, `refreshes` times (None: until interrupted);
    `moves` carries the spans seen before, so a move between the first view and the next is noted."""
    moves = MoveLog(MOVES_SHOWN) if moves is None else moves
    done = 0
    while refreshes is None or done < refreshes:
        gather(discovery, model, period, moves)
        show(take_snapshot(discovery, model, moves))
        done += 1


def _web_config(web: bool, port: int | None, host: str | None, json_: bool, watch_: bool) -> WebConfig | None:
    """The web view's settings from the options (None without --web); usage errors for options that do not mix."""
    if not web:
        if port is not None or host is not None:
            raise UsageError("--port and --host are for --web")
        return None
    if json_ or watch_:
        raise UsageError("--web is live already and serves its JSON at /api/status: drop --json and --watch")
    from .web import WebConfig

    defaults = WebConfig()
    port = defaults.port if port is None else port
    if not 0 <= port <= 65535:
        raise UsageError("--port must be between 0 and 65535")
    return WebConfig(host=defaults.host if host is None else host, port=port)


def _serve_web(discovery: Discovery, model: str | None, config: WebConfig) -> None:
    from .web import is_loopback, serve_status

    def started(url: str) -> None:
        print(url, flush=True)  # data on stdout: where the page is
        err_console.print(f"[green]web view[/] of the swarm at [bold]{url}[/] (refreshed every {config.poll:g} s; "
                          "Ctrl-C to stop)")
        if not is_loopback(config.host):
            err_console.print(f"[yellow]served on {config.host}: anyone who can reach it can read the swarm's "
                              "status[/]")

    serve_status(discovery, model, config, MoveLog(MOVES_SHOWN), on_start=started)


def status(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Argument(help="Show only this model (id, alias or directory).")] = None,
    initial_peers: InitialPeersOption = None,
    mdns: MdnsOption = None,
    mdns_interface: MdnsInterfaceOption = None,
    swarm_key: SwarmKeyOption = None,
    wait: Annotated[float, typer.Option(help="Seconds to listen before showing the swarm.")] = 2.0,
    json_: Annotated[bool, typer.Option(
        "--json", help="Print JSON on stdout instead of tables (with --watch: one object per line per refresh).")
    ] = False,
    watch_: Annotated[bool, typer.Option("--watch", help="Refresh the view live until Ctrl-C.")] = False,
    web: Annotated[bool, typer.Option(
        "--web", help="Serve the view as a live web page (and its JSON at /api/status) until Ctrl-C.")] = False,
    port: Annotated[int | None, typer.Option(help="With --web: the TCP port to serve on (0: any free one).",
                                             show_default="8080")] = None,
    host: Annotated[str | None, typer.Option(help="With --web: the address to serve on (another than 127.0.0.1 "
                                                  "lets other machines read the page).",
                                             show_default="127.0.0.1")] = None,
    log_level: LogLevelOption = None,
) -> None:
    """What the swarm serves, how well, and how well its servers are arranged."""
    setup_logging(log_level, default="WARNING")
    model, peers = model_and_peers(model, initial_peers, list(ctx.args))
    if wait < 0:
        raise UsageError("--wait must be 0 or more")
    web_config = _web_config(web, port, host, json_, watch_)
    key = load_swarm_key(swarm_key)
    with listener(peers, mdns, mdns_interface, key) as discovery:
        if web_config is not None:
            _serve_web(discovery, model, web_config)
            return
        moves = MoveLog(MOVES_SHOWN)
        gather(discovery, model, wait, moves)
        snap = take_snapshot(discovery, model, moves)
        if watch_ and json_:
            print(json.dumps(as_json(snap)), flush=True)
            watch(discovery, model, lambda s: print(json.dumps(as_json(s)), flush=True), moves=moves)
            return
        if not watch_:
            if not snap.servers:
                of = f" of {model!r}" if model is not None else ""
                raise SwarmError(f"found no server{of} ({searched(peers, mdns, mdns_interface, wait, discovery)})")
            if json_:
                print(json.dumps(as_json(snap), indent=2))
            else:
                print_wide(render(snap))
            return
        if not err_console.is_terminal:  # a log or a pipe: one whole view per refresh, nothing redrawn in place
            print_wide(render(snap))
            watch(discovery, model, lambda s: print_wide(render(s)), moves=moves)
            return
        from rich.live import Live

        def rows() -> int:  # as many servers as leave the rest of the view on the screen
            return max(5, err_console.height - 16)

        # redrawn when a snapshot is taken, not in between: a swarm of a thousand servers takes a while to draw
        with Live(render(snap, rows()), console=err_console, auto_refresh=False) as live:
            live.refresh()
            watch(discovery, model, lambda s: live.update(render(s, rows()), refresh=True), moves=moves)


__all__ = ["status"]
