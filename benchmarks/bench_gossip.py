"""How many gossip rounds until every peer knows every other: N simulated peers in one process, no sockets.

What it does, for each N (default 4, 8, 16, 32, 64): builds N `Membership` tables and N `GossipNode`s (never
started, so no socket is opened; peer addresses are placeholders used as names). Peer 0 is the seed: every other
peer starts knowing only its own record and the seed's record, the seed only its own. A round advances a shared
fake clock by one gossip period, then every peer, in a random order, bumps its own record (the heartbeat, as
`GossipNode` does through `refresh_own`), expires stale records, and does a push-pull exchange with up to `fanout`
random peers it knows: the target's `GossipNode.handle` merges what the peer pushes and answers with its own table,
which the peer merges. Merging, validation and expiry are the library's own code (`Membership`, `GossipNode.handle`),
nothing is copied here. The count is the number of rounds until every table holds all N records. Each N is run for
--trials trials with different random seeds; the table shows the median and the worst count next to log2 N (epidemic
gossip is expected to converge in O(log N) rounds).

Run (from the repository root, no network needed; the default run takes under a minute):

    .venv/bin/python benchmarks/bench_gossip.py
    .venv/bin/python benchmarks/bench_gossip.py --peers 8,64,128 --fanout 2 --trials 20 --json gossip.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from swarm.transport.gossip import GossipConfig, GossipNode, Membership
from swarm.transport.records import ServerRecord

MAX_ROUNDS = 200  # a trial that has not converged by then is reported as failed


class Clock:
    """A shared fake clock: gossip periods pass instantly."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_record(i: int) -> ServerRecord:
    return ServerRecord(peer_id=f"{i + 1:016x}", model="bench", start=0, end=1, num_blocks=1, hidden_size=8,
                        addresses=(f"tcp://10.0.0.{i // 250 + 1}:{10000 + i}",), seq=1, ttl=15.0)


def converge(n: int, fanout: int, rng: random.Random) -> tuple[int, int]:
    """Rounds until all n tables hold n records, and the number of exchanges it took (or MAX_ROUNDS + 1)."""
    config = GossipConfig(period=1.0, fanout=fanout)
    clock = Clock()
    tables = [Membership(config, clock=clock) for _ in range(n)]
    nodes = [GossipNode(m, config) for m in tables]
    own = [make_record(i) for i in range(n)]
    index = {record.addresses[0]: i for i, record in enumerate(own)}
    for i, m in enumerate(tables):
        m.set_own(own[i])
        if i:
            m.merge([own[0]])
    exchanges = 0
    try:
        for rounds in range(1, MAX_ROUNDS + 1):
            clock.now += config.period
            for i in rng.sample(range(n), n):
                own[i] = own[i].bump()
                tables[i].set_own(own[i])
                tables[i].expire()
                known = tables[i].peer_addresses()
                for address in rng.sample(known, min(fanout, len(known))):
                    reply = nodes[index[address]].handle({"records": tables[i].to_wire()})  # push
                    tables[i].merge(reply["records"])  # pull
                    exchanges += 1
            if all(len(m.records()) == n for m in tables):
                return rounds, exchanges
        return MAX_ROUNDS + 1, exchanges
    finally:
        for node in nodes:
            node.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--peers", default="4,8,16,32,64", help="comma-separated peer counts N")
    parser.add_argument("--fanout", type=int, default=3, help="peers contacted per round")
    parser.add_argument("--trials", type=int, default=10, help="trials per N, each with its own random seed")
    parser.add_argument("--seed", type=int, default=0, help="base random seed")
    parser.add_argument("--json", dest="json_", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.peers.split(",") if s.strip()]
    if any(n < 2 for n in sizes) or args.fanout < 1 or args.trials < 1:
        parser.error("peer counts must be >= 2, --fanout and --trials >= 1")

    console = Console(stderr=True)
    results = []
    started = time.perf_counter()
    for n in sizes:
        runs = [converge(n, args.fanout, random.Random(args.seed * 1_000_003 + n * 1009 + t))
                for t in range(args.trials)]
        rounds = [r for r, _ in runs]
        results.append({"n": n, "fanout": args.fanout, "rounds": rounds, "median_rounds": statistics.median(rounds),
                        "max_rounds": max(rounds), "log2_n": math.log2(n),
                        "mean_exchanges": statistics.mean(e for _, e in runs),
                        "converged": all(r <= MAX_ROUNDS for r in rounds)})

    caption = f"rounds until every peer knows all N, {args.trials} trials per N"
    table = Table(title="gossip convergence", caption=caption)
    for column in ("N", "fanout", "median rounds", "max rounds", "log2 N"):
        table.add_column(column, justify="right")
    for r in results:
        worst = str(r["max_rounds"]) if r["converged"] else f"[red]> {MAX_ROUNDS}[/red]"
        table.add_row(str(r["n"]), str(r["fanout"]), f"{r['median_rounds']:g}", worst, f"{r['log2_n']:.1f}")
    console.print(table)
    console.print(f"took {time.perf_counter() - started:.1f} s (python {platform.python_version()})")

    if args.json_:
        args.json_.write_text(json.dumps({"peers": sizes, "fanout": args.fanout, "trials": args.trials,
                                          "seed": args.seed, "max_rounds": MAX_ROUNDS, "results": results},
                                         indent=2))
    return 0 if all(r["converged"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
