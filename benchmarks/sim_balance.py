"""How well servers that place themselves keep a swarm balanced: a discrete-event simulation of the placement policies.

The policies are the library's own (`swarm.core.balance`: `choose_span` at join, a `Rebalancer` per server running
`plan_move` every jittered period); nothing of them is copied here. Petals' rule runs in the same simulator for
comparison, written out below from its `block_selection.py`: join on the window whose sorted throughputs are lowest
(first on ties), and move when, after the server's own move and the others' best responses (in a random order), the
bottleneck now is below `balance_quality` times the bottleneck after; no confirmations, no minimum interval, no
last-server rule.

The swarm: `--servers` servers, a `--gpu-share` of GPU-class ones (announced throughput 60 to 240 tokens/s, room for a
quarter to a half of the model's blocks) and CPU-class ones (2 to 10 tokens/s, 2 to 8 blocks), over a model of
`--blocks` blocks. Throughputs are drawn log-uniformly, so no two servers are alike. Each server:
- at join reads the records it sees, chooses its span, announces it (state joining: counted by the policies), loads
  it (`--load-per-block` seconds per block, twice that on CPU servers) and serves it (online);
- checks every `--period` seconds (times a uniform jitter of +-50%) whether to move; a move announces draining (the
  server stops serving at once and others stop counting it), finishes its sessions (`--drain` seconds), announces the
  new span (joining), loads it and serves it again;
- leaves gracefully (its record goes) or crashes (it stops serving at once; its record stays until its `--ttl`).
What a server sees is the records as they were `--delay` seconds ago (gossip), its own state exactly.

The run has four phases over `--duration` seconds: the servers join within the first minute and the swarm settles
(first quarter: "calm"), servers come and go (next half: each lives an exponential time of mean `--life`, half leave
and half crash, and new ones arrive at the rate that keeps the count steady: "churn"), then `--crash-share` of the
live servers crash at once and nobody joins ("crash"), and the rest of the run shows the recovery.

Measured every `--sample` seconds: the bottleneck of the servers actually serving (the least-served block's summed
throughput, 0 while a block has no server), against two references for the same live servers (loading or moving
ones included): `optimum`'s upper bound (exact only for tiny swarms; measured against it, a quality is never
overstated) and the bottleneck of `best_arrangement` (a placement found centrally by greedy joins and rounds of best
responses, a lower bound of the optimum; computed up to 300 live servers). Reported per policy: the mean quality
(bottleneck / bound, and / best found) over the last half of the calm phase ("converged"), over the churn phase and
over the last quarter; the moves per phase; the time from the big crash until every block is covered again and until
the quality against the best placement found is back at 0.95; and the moves that left a block without any serving
server (the move itself; a crash or a leave doing that is churn's doing and is not counted).

Run (from the repository root). The default (30 servers, 64 blocks, 3 simulated hours) takes about 20 s on 2 cores;
200 servers over 2 hours with `--period 120` about 2 minutes for swarm's policy and 7 for Petals' (its best responses
loop over every server at every check); for 1000 servers run swarm's policy alone (`--policies swarm`), which takes
tens of minutes:

    .venv/bin/python benchmarks/sim_balance.py
    .venv/bin/python benchmarks/sim_balance.py --servers 200 --blocks 80 --duration 7200 --period 120 --json sim.json
    .venv/bin/python benchmarks/sim_balance.py --servers 1000 --blocks 80 --duration 7200 --period 120 --policies swarm
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from swarm.core.balance import (
    BalanceConfig,
    Rebalancer,
    ServerLoad,
    best_arrangement,
    bottleneck,
    choose_span,
    optimum,
)

BEST_UP_TO = 300  # live servers up to which `best_arrangement` is computed as a reference
PETALS_MAX_ROUNDS = 20  # Petals loops until no one moves; bounded here


# ---------------------------------------------------------------------------------------------------- Petals' rule


def petals_choose_start(throughputs: np.ndarray, length: int) -> int:
    """Petals' `_choose_best_start`: the window whose sorted throughputs are lowest, the first on ties
    (`min((sorted(throughputs[i:i + length]), i) for i in ...)[-1]`, vectorized)."""
    windows = np.sort(np.lib.stride_tricks.sliding_window_view(throughputs, length), axis=1)
    return int(np.lexsort(windows.T[::-1])[0])  # lexsort is stable: the first window among equal ones


def petals_profile(servers: list[ServerLoad], num_blocks: int) -> np.ndarray:
    out = np.zeros(num_blocks)
    for s in servers:
        out[s.start:s.end] += s.throughput
    return out


def petals_should_move(servers: list[ServerLoad], num_blocks: int, me: str, balance_quality: float,
                       rng: random.Random) -> bool:
    """Petals' `should_choose_other_blocks`, with its shuffle drawn from `rng` and its loop bounded."""
    spans = {s.peer_id: [s.start, s.end, s.throughput] for s in servers}
    if me not in spans:
        return False
    throughputs = petals_profile(servers, num_blocks)
    initial = throughputs.min()
    eps = 1e-3
    start, end, speed = spans[me]
    throughputs[start:end] -= speed * (1 + eps)
    new_start = petals_choose_start(throughputs, end - start)
    if new_start == start:
        return False
    throughputs[start:end] += speed * eps
    spans[me] = [new_start, new_start + end - start, speed]
    throughputs[new_start:new_start + end - start] += speed
    moved, rounds = True, 0
    while moved and rounds < PETALS_MAX_ROUNDS:
        rounds += 1
        peers = sorted(spans)
        rng.shuffle(peers)
        moved = False
        for peer in peers:
            a, b, t = spans[peer]
            throughputs[a:b] -= t * (1 + eps)
            s = petals_choose_start(throughputs, b - a)
            throughputs[a:b] += t * eps
            if s != a:
                spans[peer] = [s, s + b - a, t]
                moved = True
            a, b, _ = spans[peer]
            throughputs[a:b] += t
    new = throughputs.min()
    if new < initial or new < eps:
        return False
    return initial / new < balance_quality - eps


# ---------------------------------------------------------------------------------------------------- policies


class SwarmPolicy:
    """swarm's own: `choose_span` at join, a `Rebalancer` per server."""

    name = "swarm"

    def __init__(self, config: BalanceConfig, clock):
        self.config = config
        self.clock = clock

    def join(self, view: list[ServerLoad], num_blocks: int, length: int, speed: float, me: str) -> int:
        return choose_span(view, num_blocks, length, speed, me)[0]

    def checker(self):
        return Rebalancer(self.config, clock=self.clock)

    def check(self, checker, view, num_blocks: int, me: str) -> int | None:
        move = checker.check(view, num_blocks, me)
        if move is None:
            return None
        checker.moved()
        return move.start


class PetalsPolicy:
    """Petals' rule: least-throughput window at join; move when the bottleneck would improve by balance_quality."""

    name = "petals"

    def __init__(self, config: BalanceConfig, rng: random.Random):
        self.config = config
        self.rng = rng

    def join(self, view: list[ServerLoad], num_blocks: int, length: int, speed: float, me: str) -> int:
        return petals_choose_start(petals_profile([s for s in view if s.peer_id != me], num_blocks), length)

    def checker(self):
        return None

    def check(self, checker, view, num_blocks: int, me: str) -> int | None:
        if not petals_should_move(view, num_blocks, me, self.config.balance_quality, self.rng):
            return None
        mine = next(s for s in view if s.peer_id == me)
        return self.join(view, num_blocks, mine.length, mine.throughput, me)


# ---------------------------------------------------------------------------------------------------- simulation


@dataclass
class Server:
    peer_id: str
    speed: float  # announced tokens/s
    length: int  # blocks it can hold
    load_time: float  # seconds to load its span
    gpu: bool
    state: str = "loading"  # loading | online | draining | gone
    start: int = 0
    checker: object = None
    epoch: int = 0  # bumped by every state change, so stale events are dropped
    moves: int = 0


@dataclass
class Params:
    servers: int = 30
    blocks: int = 64
    duration: float = 3 * 3600.0
    gpu_share: float = 0.3
    period: float = 60.0
    delay: float = 2.0
    ttl: float = 30.0
    drain: float = 10.0
    load_per_block: float = 2.0
    life: float = 2 * 3600.0
    crash_share: float = 0.25
    sample: float = 15.0
    seed: int = 0
    quality: float = BalanceConfig.balance_quality  # swarm's --balance-quality
    petals_quality: float = 0.75  # Petals' default balance_quality
    confirmations: int = BalanceConfig.confirmations
    min_interval: float = BalanceConfig.min_interval


@dataclass
class Run:
    policy: str
    times: list[float] = field(default_factory=list)
    bottleneck: list[float] = field(default_factory=list)
    bound: list[float] = field(default_factory=list)
    best: list[float | None] = field(default_factory=list)
    uncovered: list[int] = field(default_factory=list)  # blocks without a serving server at the sample
    moves: list[float] = field(default_factory=list)  # times of moves
    move_gaps: list[dict] = field(default_factory=list)  # moves that left a block without a serving server
    joins: int = 0
    leaves: int = 0
    crashes: int = 0


class Sim:
    def __init__(self, p: Params, policy_name: str):
        self.p = p
        self.now = 0.0
        self.rng = random.Random(p.seed)  # the swarm: who joins, how fast, when they leave (the same for both)
        self.jitter = random.Random(p.seed + 1)  # periods
        if policy_name == "swarm":
            config = BalanceConfig(p.quality, p.min_interval, p.confirmations)
            self.policy = SwarmPolicy(config, clock=lambda: self.now)
        else:
            self.policy = PetalsPolicy(BalanceConfig(p.petals_quality), random.Random(p.seed + 2))
        self.run = Run(policy_name)
        self.events: list[tuple[float, int, str, str, int]] = []
        self.seq = 0
        self.servers: dict[str, Server] = {}
        self.records: dict[str, list[tuple[float, ServerLoad | None]]] = {}  # (visible from, record) per peer
        self.next_id = 0
        self.live_version = 0
        self._refs: tuple[int, float, float | None] | None = None
        self.calm_end = p.duration * 0.25
        self.crash_at = p.duration * 0.75

    # events
    def at(self, when: float, kind: str, peer: str = "", epoch: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.events, (when, self.seq, kind, peer, epoch))

    def publish(self, server: Server, record: ServerLoad | None, delay: float | None = None) -> None:
        entries = self.records.setdefault(server.peer_id, [])
        visible = self.now + (self.p.delay if delay is None else delay)
        entries.append((visible, record))
        while len(entries) > 1 and entries[1][0] <= self.now:
            entries.pop(0)

    def view(self, me: Server) -> list[ServerLoad]:
        out = []
        for peer, entries in self.records.items():
            if peer == me.peer_id:
                continue
            seen = None
            for visible, record in entries:
                if visible <= self.now:
                    seen = record
            if seen is not None:
                out.append(seen)
        if me.state in ("loading", "online"):
            out.append(ServerLoad(me.peer_id, me.start, me.start + me.length, me.speed, me.state == "online"))
        return out

    def serving(self) -> list[ServerLoad]:
        return [ServerLoad(s.peer_id, s.start, s.start + s.length, s.speed)
                for s in self.servers.values() if s.state == "online"]

    def live(self) -> list[Server]:
        return [s for s in self.servers.values() if s.state != "gone"]

    # the swarm
    def new_server(self) -> Server:
        self.next_id += 1
        peer = f"{self.rng.getrandbits(256):064x}"
        gpu = self.rng.random() < self.p.gpu_share
        b = self.p.blocks
        if gpu:
            speed = math.exp(self.rng.uniform(math.log(60), math.log(240)))
            length = self.rng.randint(max(1, b // 4), max(1, b // 2))
            load = self.p.load_per_block * length
        else:
            speed = math.exp(self.rng.uniform(math.log(2), math.log(10)))
            length = self.rng.randint(2, min(8, b))
            load = 2 * self.p.load_per_block * length
        server = Server(peer, speed, length, load, gpu)
        self.servers[peer] = server
        return server

    def join(self, server: Server) -> None:
        server.start = self.policy.join(self.view(server), self.p.blocks, server.length, server.speed, server.peer_id)
        server.state, server.checker = "loading", self.policy.checker()
        server.epoch += 1
        self.publish(server, ServerLoad(server.peer_id, server.start, server.start + server.length, server.speed,
                                        False))
        self.at(self.now + server.load_time, "loaded", server.peer_id, server.epoch)
        self.run.joins += 1
        self.live_version += 1

    def lifetime(self, server: Server) -> None:
        if self.calm_end <= self.now < self.crash_at:
            end = self.now + self.rng.expovariate(1.0 / self.p.life)
            if end < self.crash_at:
                self.at(end, "crash" if self.rng.random() < 0.5 else "leave", server.peer_id, -1)  # whatever it does

    def stop(self, server: Server, crash: bool) -> None:
        server.state = "gone"
        server.epoch += 1
        self.publish(server, None, self.p.ttl if crash else None)
        self.live_version += 1
        if crash:
            self.run.crashes += 1
        else:
            self.run.leaves += 1

    def next_check(self, server: Server) -> None:
        self.at(self.now + self.p.period * self.jitter.uniform(0.5, 1.5), "check", server.peer_id, server.epoch)

    def check(self, server: Server) -> None:
        target = self.policy.check(server.checker, self.view(server), self.p.blocks, server.peer_id)
        if target is None or target == server.start:
            self.next_check(server)
            return
        before = {b for b, c in enumerate(self.coverage()) if c == 0}
        view = self.view(server)
        server.state = "draining"
        server.epoch += 1
        server.moves += 1
        self.run.moves.append(self.now)
        self.publish(server, None)
        after = {b for b, c in enumerate(self.coverage()) if c == 0}
        if after - before:
            # did the mover believe another server held those blocks? (a crashed one whose record had not expired,
            # or one whose own move it had not heard of yet)
            believed = [v.peer_id for v in view if v.peer_id != server.peer_id and v.online
                        and any(v.start <= b < v.end for b in after - before)]
            stale = [p for p in believed if self.servers[p].state == "gone"]
            self.run.move_gaps.append({"time": self.now, "blocks": sorted(after - before),
                                       "span": [server.start, server.start + server.length], "to": target,
                                       "believed_held_by_crashed": bool(stale), "believed_held": bool(believed),
                                       "swarm_had_gap": bool(before)})
        server.start = target
        self.at(self.now + self.p.drain, "drained", server.peer_id, server.epoch)

    def coverage(self) -> list[int]:
        counts = [0] * self.p.blocks
        for s in self.servers.values():
            if s.state == "online":
                for b in range(s.start, s.start + s.length):
                    counts[b] += 1
        return counts

    # measuring
    def references(self) -> tuple[float, float | None]:
        if self._refs is None or self._refs[0] != self.live_version:
            live = self.live()
            bound = optimum([s.speed for s in live], [s.length for s in live], self.p.blocks)
            best = None
            if len(live) <= BEST_UP_TO:
                loads = [ServerLoad(s.peer_id, 0, s.length, s.speed) for s in live]
                best = bottleneck(best_arrangement(loads, self.p.blocks), self.p.blocks)
            self._refs = (self.live_version, bound, best)
        return self._refs[1], self._refs[2]

    def sample(self) -> None:
        serving = self.serving()
        bound, best = self.references()
        self.run.times.append(self.now)
        self.run.bottleneck.append(bottleneck(serving, self.p.blocks))
        self.run.bound.append(bound)
        self.run.best.append(best)
        self.run.uncovered.append(sum(1 for c in self.coverage() if c == 0))

    def simulate(self) -> Run:
        p = self.p
        for _ in range(p.servers):
            self.at(self.rng.uniform(0, 60), "arrive")
        if p.life > 0:
            t = self.calm_end
            rate = p.servers / p.life
            while True:
                t += self.rng.expovariate(rate)
                if t >= self.crash_at:
                    break
                self.at(t, "arrive")
        self.at(self.calm_end, "churn")
        self.at(self.crash_at, "bigcrash")
        t = 0.0
        while t <= p.duration:
            self.at(t, "sample")
            t += p.sample
        while self.events:
            when, _, kind, peer, epoch = heapq.heappop(self.events)
            if when > p.duration:
                break
            self.now = when
            server = self.servers.get(peer)
            if server is not None and (server.state == "gone" or 0 <= epoch != server.epoch):
                continue  # a stale event: the server changed state since
            if kind == "sample":
                self.sample()
            elif kind == "arrive":
                server = self.new_server()
                self.join(server)
                self.lifetime(server)
            elif kind == "loaded":
                server.state = "online"
                self.publish(server, ServerLoad(server.peer_id, server.start, server.start + server.length,
                                                server.speed))
                self.next_check(server)
            elif kind == "check":
                if server.state == "online":
                    self.check(server)
            elif kind == "drained":
                server.state = "loading"
                self.publish(server, ServerLoad(server.peer_id, server.start, server.start + server.length,
                                                server.speed, False))
                self.at(self.now + server.load_time, "loaded", server.peer_id, server.epoch)
            elif kind in ("crash", "leave"):
                self.stop(server, kind == "crash")
            elif kind == "churn":
                for s in list(self.live()):
                    self.lifetime(s)
            elif kind == "bigcrash":
                live = sorted(self.live(), key=lambda s: s.peer_id)
                for s in self.rng.sample(live, int(len(live) * p.crash_share)):
                    self.stop(s, crash=True)
        return self.run


# ---------------------------------------------------------------------------------------------------- report


def _ratio(a: float, b: float | None) -> float | None:
    if b is None:
        return None
    return a / b if b > 0 else None  # no reference: nothing to compare with (e.g. before anyone has joined)


def summarize(run: Run, p: Params) -> dict:
    calm_end, crash_at = p.duration * 0.25, p.duration * 0.75
    vs_bound = [_ratio(b, u) for b, u in zip(run.bottleneck, run.bound, strict=True)]
    vs_best = [_ratio(b, u) for b, u in zip(run.bottleneck, run.best, strict=True)]

    def mean(values, lo, hi):
        chosen = [v for t, v in zip(run.times, values, strict=True) if lo <= t < hi and v is not None]
        return statistics.fmean(chosen) if chosen else None

    def count(lo, hi):
        return sum(1 for t in run.moves if lo <= t < hi)

    covered = best_back = None
    for t, u, q in zip(run.times, run.uncovered, vs_best, strict=True):
        if t < crash_at:
            continue
        if covered is None and u == 0:
            covered = t - crash_at
        if best_back is None and q is not None and q >= 0.95:
            best_back = t - crash_at
    phases = {"converged": (calm_end / 2, calm_end), "churn": (calm_end, crash_at),
              "end": (p.duration * 0.875, p.duration + 1)}
    return {
        "policy": run.policy,
        "quality_vs_bound": {k: mean(vs_bound, *v) for k, v in phases.items()},
        "quality_vs_best": {k: mean(vs_best, *v) for k, v in phases.items()},
        "moves": {"calm": count(0, calm_end), "churn": count(calm_end, crash_at),
                  "after_crash": count(crash_at, p.duration + 1), "total": len(run.moves)},
        "recovery_s": {"covered": covered, "quality_0.95": best_back},
        "moves_that_uncovered": len(run.move_gaps),
        # of which the mover believed the blocks held by no one else (its view, not a stale record, was wrong)
        # a last holder may move only while the swarm already has a gap (nothing to lose), keeping its blocks in its
        # new span: its blocks are without a server while it loads; any other knowing uncovering is a policy bug
        "moves_that_uncovered_knowingly": sum(1 for g in run.move_gaps
                                              if not g["believed_held"] and not g["swarm_had_gap"]),
        "moves_closing_a_gap_through_own_blocks": sum(1 for g in run.move_gaps
                                                      if not g["believed_held"] and g["swarm_had_gap"]),
        "moves_that_uncovered_stale": sum(1 for g in run.move_gaps if g["believed_held_by_crashed"]),
        "move_gaps": run.move_gaps[:20],
        "joins": run.joins, "leaves": run.leaves, "crashes": run.crashes,
        "series": {"t": run.times, "bottleneck": run.bottleneck, "bound": run.bound, "best": run.best,
                   "uncovered": run.uncovered, "moves": run.moves},
    }


def simulate(p: Params, policies: list[str]) -> list[dict]:
    return [summarize(Sim(p, name).simulate(), p) for name in policies]


def plot(results: list[dict], p: Params, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for r, color in zip(results, ("tab:blue", "tab:orange", "tab:green"), strict=False):
        s = r["series"]
        hours = [t / 3600 for t in s["t"]]
        best = [_ratio(b, u) for b, u in zip(s["bottleneck"], s["best"], strict=True)]
        bound = [_ratio(b, u) for b, u in zip(s["bottleneck"], s["bound"], strict=True)]
        if any(v is not None for v in best):
            ax.plot(hours, [math.nan if v is None else v for v in best], color=color, lw=1.2,
                    label=f"{r['policy']}: / best placement found ({r['moves']['total']} moves)")
        ax.plot(hours, [math.nan if v is None else v for v in bound], color=color, lw=0.8, ls=":",
                label=f"{r['policy']}: / upper bound")
    for x, label in ((p.duration * 0.25 / 3600, "churn"), (p.duration * 0.75 / 3600, "crash")):
        ax.axvline(x, color="grey", lw=0.8, ls="--")
        ax.text(x, 1.02, label, color="grey", fontsize=8)
    ax.axhline(0.95, color="grey", lw=0.5)
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("hours")
    ax.set_ylabel("bottleneck / reference")
    ax.set_title(f"{p.servers} servers ({p.gpu_share:.0%} GPU-class), {p.blocks} blocks, seed {p.seed}")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x: float | None, pattern: str = "{:.3f}") -> str:
    return "-" if x is None else pattern.format(x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    defaults = Params()
    parser.add_argument("--servers", type=int, default=defaults.servers, help="servers at the start (10 to 1000)")
    parser.add_argument("--blocks", type=int, default=defaults.blocks, help="blocks in the model (32 to 80)")
    parser.add_argument("--duration", type=float, default=defaults.duration, help="simulated seconds")
    parser.add_argument("--gpu-share", type=float, default=defaults.gpu_share, help="share of GPU-class servers")
    parser.add_argument("--period", type=float, default=defaults.period, help="mean seconds between checks")
    parser.add_argument("--delay", type=float, default=defaults.delay, help="seconds before others see a record")
    parser.add_argument("--ttl", type=float, default=defaults.ttl, help="seconds a crashed server's record stays")
    parser.add_argument("--drain", type=float, default=defaults.drain, help="seconds a moving server drains")
    parser.add_argument("--load-per-block", type=float, default=defaults.load_per_block,
                        help="seconds to load one block (GPU class; CPU class twice that)")
    parser.add_argument("--life", type=float, default=defaults.life, help="mean lifetime in the churn phase (s)")
    parser.add_argument("--crash-share", type=float, default=defaults.crash_share,
                        help="share of live servers that crash at once at 3/4 of the run")
    parser.add_argument("--sample", type=float, default=defaults.sample, help="seconds between measurements")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--balance-quality", type=float, default=defaults.quality, help="swarm's threshold")
    parser.add_argument("--confirmations", type=int, default=defaults.confirmations, help="swarm's hysteresis")
    parser.add_argument("--min-interval", type=float, default=defaults.min_interval,
                        help="swarm's seconds between two moves of a server")
    parser.add_argument("--petals-quality", type=float, default=defaults.petals_quality,
                        help="Petals' balance_quality (its default: 0.75)")
    parser.add_argument("--policies", default="swarm,petals", help="comma-separated: swarm, petals")
    parser.add_argument("--json", dest="json_", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--plot", default="sim_balance.png", help="PNG to write ('' for none)")
    args = parser.parse_args(argv)
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    if args.servers < 1 or args.blocks < 1 or args.duration <= 0 or args.period <= 0 or args.sample <= 0:
        parser.error("--servers, --blocks, --duration, --period and --sample must be positive")
    if any(x not in ("swarm", "petals") for x in policies):
        parser.error("--policies takes swarm and/or petals")
    p = Params(servers=args.servers, blocks=args.blocks, duration=args.duration, gpu_share=args.gpu_share,
               period=args.period, delay=args.delay, ttl=args.ttl, drain=args.drain,
               load_per_block=args.load_per_block, life=args.life, crash_share=args.crash_share,
               sample=args.sample, seed=args.seed, quality=args.balance_quality,
               petals_quality=args.petals_quality, confirmations=args.confirmations, min_interval=args.min_interval)

    started = time.perf_counter()
    results = []
    for name in policies:
        t0 = time.perf_counter()
        results.append(summarize(Sim(p, name).simulate(), p))
        results[-1]["wall_s"] = time.perf_counter() - t0

    console = Console(width=max(Console().width, 130))
    table = Table(title=f"sim_balance: {p.servers} servers, {p.blocks} blocks, {p.duration / 3600:g} h, seed {p.seed}",
                  caption="quality = serving bottleneck / best placement found (/ upper bound); moves per phase")
    for column in ("policy", "converged", "churn", "end", "moves calm/churn/crash", "covered after crash",
                   "0.95 after crash", "moves that uncovered (stale record)"):
        table.add_column(column, justify="right")
    for r in results:
        qb, qu, m, rec = r["quality_vs_best"], r["quality_vs_bound"], r["moves"], r["recovery_s"]
        table.add_row(r["policy"], *(f"{_fmt(qb[k])} ({_fmt(qu[k])})" for k in ("converged", "churn", "end")),
                      f"{m['calm']}/{m['churn']}/{m['after_crash']}", _fmt(rec["covered"], "{:.0f} s"),
                      _fmt(rec["quality_0.95"], "{:.0f} s"),
                      f"{r['moves_that_uncovered']} ({r['moves_that_uncovered_stale']})")
    console.print(table)
    for r in results:
        console.print(f"{r['policy']}: {r['joins']} joins, {r['leaves']} leaves, {r['crashes']} crashes; "
                      f"simulated in {r['wall_s']:.1f} s")
    console.print(f"took {time.perf_counter() - started:.1f} s (python {platform.python_version()})")
    if args.plot:
        plot(results, p, Path(args.plot))
        console.print(f"plot: {args.plot}")
    if args.json_:
        args.json_.write_text(json.dumps({"params": p.__dict__, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
