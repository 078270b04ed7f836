"""Route choice as pure functions over a snapshot of the swarm: which servers run which blocks.

Each function covers blocks [start, end) with a chain of hops, each a contiguous run of blocks on one server, from
the servers' spans as plain data (no sockets):
- `plan_inference`: the chain with the lowest expected step time, counting each hop's measured round trip and its
  compute time (from the server's announced throughput), among servers with cache room for the session;
- `plan_forward`: for batch forward/backward, at each block a server drawn with probability proportional to its
  throughput, so that many clients spread their load.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from ...transport.errors import SwarmError


class MissingBlocks(SwarmError):
    """No known server covers some blocks of the model."""

    code = "missing_blocks"

    def __init__(self, missing: list[tuple[int, int]], known: Sequence[tuple[int, int]], waited: float = 0.0,
                 note: str = ""):
        gaps = ", ".join(f"{a}:{b}" for a, b in missing)
        served = ", ".join(f"{a}:{b}" for a, b in sorted(set(known))) or "nothing"
        after = f" after waiting {waited:g} s" if waited else ""
        super().__init__(f"no server covers blocks {gaps}{after} (live servers cover {served}"
                         f"{'; ' + note if note else ''}); start a server with `swarm serve MODEL --blocks "
                         f"{missing[0][0]}:{missing[0][1]}` or point at more peers")
        self.missing = missing


class MissingAdapter(MissingBlocks):
    """No known server holds (or can load) the adapter asked for, for some blocks of the model."""

    code = "missing_adapter"

    def __init__(self, adapter: str, missing: list[tuple[int, int]], holding: Sequence[tuple[int, int]],
                 all_servers: Sequence[tuple[int, int]], waited: float = 0.0):
        SwarmError.__init__(self, "")
        gaps = ", ".join(f"{a}:{b}" for a, b in missing)
        held = ", ".join(f"{a}:{b}" for a, b in sorted(set(holding))) or "no block"
        served = ", ".join(f"{a}:{b}" for a, b in sorted(set(all_servers))) or "nothing"
        after = f" after waiting {waited:g} s" if waited else ""
        self.args = (f"no server holds adapter {adapter!r} for blocks {gaps}{after} (servers with it cover {held}; "
                     f"all live servers cover {served}); start one with `swarm serve MODEL --blocks "
                     f"{missing[0][0]}:{missing[0][1]} --adapters {adapter}`, or choose another adapter",)
        self.missing, self.holding, self.all_servers = missing, list(holding), list(all_servers)


DEFAULT_RTT = 0.01  # seconds assumed for a server not pinged yet
DEFAULT_SPAN_TIME = 0.05  # seconds assumed per token through a whole span when a server announces no throughput


@dataclass(frozen=True)
class SpanInfo:
    """What routing needs to know of one server."""

    peer: str  # endpoint
    start: int
    end: int
    rtt: float | None = None  # measured round trip, seconds (None: not measured yet)
    throughput: float = 0.0  # tokens/s through the server's whole span
    cache_free: int | None = None  # free attention-cache tokens (None: unknown)

    def hop_time(self, blocks: int) -> float:
        """Expected seconds for one step of `blocks` of this server's blocks: round trip plus compute."""
        per_span = 1.0 / self.throughput if self.throughput > 0 else DEFAULT_SPAN_TIME
        rtt = DEFAULT_RTT if self.rtt is None else self.rtt
        return rtt + per_span * blocks / (self.end - self.start)


@dataclass(frozen=True)
class Hop:
    peer: str
    start: int
    end: int


def missing_ranges(spans: Sequence[SpanInfo], start: int, end: int) -> list[tuple[int, int]]:
    covered = [False] * (end - start)
    for s in spans:
        for i in range(max(s.start, start), min(s.end, end)):
            covered[i - start] = True
    gaps: list[tuple[int, int]] = []
    for i, ok in enumerate(covered):
        if ok:
            continue
        if gaps and gaps[-1][1] == start + i:
            gaps[-1] = (gaps[-1][0], start + i + 1)
        else:
            gaps.append((start + i, start + i + 1))
    return gaps


def plan_inference(spans: Sequence[SpanInfo], start: int, end: int, cache_needed: int = 0) -> list[Hop]:
    """The chain of least expected step time over servers with room for `cache_needed` cache tokens.

    When the servers with room do not cover every block, servers of unknown or too little room are used too (their
    answer at open says whether they really are full).
    """
    roomy = [s for s in spans if s.cache_free is None or s.cache_free >= cache_needed]
    if missing_ranges(roomy, start, end):
        roomy = list(spans)
    missing = missing_ranges(roomy, start, end)
    if missing:
        raise MissingBlocks(missing, [(s.start, s.end) for s in spans])
    # hops only need to start and stop at span boundaries: shortest path over those positions
    cuts = sorted({start, end, *(min(max(b, start), end) for s in roomy for b in (s.start, s.end))})
    best: dict[int, tuple[float, int, list[Hop]]] = {start: (0.0, 0, [])}
    for p in cuts:
        if p not in best or p == end:
            continue
        cost, hops, chain = best[p]
        for s in roomy:
            if not s.start <= p < s.end:
                continue
            for q in cuts:
                if p < q <= min(s.end, end):
                    candidate = (cost + s.hop_time(q - p), hops + 1, [*chain, Hop(s.peer, p, q)])
                    if q not in best or candidate[:2] < best[q][:2]:
                        best[q] = candidate
    return best[end][2]


def plan_forward(spans: Sequence[SpanInfo], start: int, end: int, rng: random.Random | None = None) -> list[Hop]:
    """A chain for batch work: at each block, a covering server drawn with probability ∝ its throughput."""
    missing = missing_ranges(spans, start, end)
    if missing:
        raise MissingBlocks(missing, [(s.start, s.end) for s in spans])
    rng = rng or random.Random()
    chain: list[Hop] = []
    position = start
    while position < end:
        candidates = [s for s in spans if s.start <= position < s.end]
        weights = [max(s.throughput, 1e-9) for s in candidates]
        chosen = rng.choices(candidates, weights=weights)[0]
        stop = min(chosen.end, end)
        chain.append(Hop(chosen.peer, position, stop))
        position = stop
    return chain
