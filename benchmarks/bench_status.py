"""What `swarm status` costs on a big swarm: building its snapshot and drawing it, for 10 to 1000 servers.

What it does: makes N signed server records of one model (80 blocks by default) with random spans (8 to 40 blocks)
and throughputs from three classes (about 50, 400 and 2000 tokens/s, +-20 %), then times, in this process:

- snapshot: `build_snapshot` (ages, suspicion, per-block throughput, bottleneck and the balance quality, which
  searches placements of the same servers: `core/balance.py`), the first time (signatures checked, quality computed)
  and again with the same records (what a `--watch` refresh costs while no server moves or joins);
- render: drawing the view at 80 columns (the table hides columns to fit, the strip folds blocks).

No network: the records are made in memory, so this measures status itself, not gossip.

Run (from the repository root; about half a minute):

    .venv/bin/python benchmarks/bench_status.py
    .venv/bin/python benchmarks/bench_status.py --servers 10,100,1000 --blocks 80 --json status.json
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from swarm.cli.status import build_snapshot, render
from swarm.transport.keys import Identity
from swarm.transport.records import ServerRecord, sign_record


def records(count: int, num_blocks: int, rng: random.Random) -> list[ServerRecord]:
    made = []
    for i in range(count):
        identity = Identity()
        length = rng.randint(min(8, num_blocks), min(40, num_blocks))
        start = rng.randint(0, num_blocks - length)
        speed = rng.choice([50.0, 400.0, 2000.0]) * rng.uniform(0.8, 1.2)
        record = ServerRecord(identity.peer_id, "bench", start, start + length, num_blocks, 8192,
                              (f"tcp://10.0.{i // 250}.{i % 250 + 1}:31330",), throughput=speed)
        made.append(sign_record(record, identity))
    return made


def measure(count: int, num_blocks: int, seed: int) -> dict[str, float]:
    made = records(count, num_blocks, random.Random(seed))
    now = time.time()
    started = time.perf_counter()
    snap = build_snapshot(made, lambda peer: None, 5.0, now)
    first = time.perf_counter() - started
    started = time.perf_counter()
    build_snapshot(made, lambda peer: None, 5.0, now)
    again = time.perf_counter() - started
    started = time.perf_counter()
    Console(file=io.StringIO(), width=80, force_terminal=True).print(render(snap))
    drawn = time.perf_counter() - started
    return {"servers": count, "blocks": num_blocks, "snapshot_first_ms": first * 1e3, "snapshot_again_ms": again * 1e3,
            "render_80_ms": drawn * 1e3, "balance_quality": snap.models[0].quality or 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--servers", default="10,100,1000", help="swarm sizes, comma-separated")
    parser.add_argument("--blocks", type=int, default=80, help="blocks of the model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    rows = [measure(int(n), args.blocks, args.seed) for n in args.servers.split(",")]
    table = Table(title=f"swarm status, {args.blocks} blocks")
    for column in ("servers", "snapshot, first (ms)", "snapshot, again (ms)", "render at 80 cols (ms)", "quality"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(f"{r['servers']}", f"{r['snapshot_first_ms']:,.1f}", f"{r['snapshot_again_ms']:,.1f}",
                      f"{r['render_80_ms']:,.1f}", f"{r['balance_quality']:.3f}")
    Console().print(table)
    if args.json_ is not None:
        args.json_.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
