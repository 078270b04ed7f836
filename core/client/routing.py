"""Route choice as pure functions over a snapshot of the swarm: which servers run which blocks.

`plan_chain` covers blocks [start, end) with a chain of hops, each a contiguous run of blocks on one server.
It takes the servers' spans as plain data and touches no socket.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...transport.errors import SwarmError


class MissingBlocks(SwarmError):
    """No known server covers some blocks of the model."""

    code = "missing_blocks"

    def __init__(self, missing: list[tuple[int, int]], known: Sequence[tuple[int, int]], waited: float = 0.0):
        gaps = ", ".join(f"{a}:{b}" for a, b in missing)
        served = ", ".join(f"{a}:{b}" for a, b in sorted(set(known))) or "nothing"
        after = f" after waiting {waited:g} s" if waited else ""
        super().__init__(f"no server covers blocks {gaps}{after} (live servers cover {served}); start a server "
                         f"with `swarm serve MODEL --blocks {missing[0][0]}:{missing[0][1]}` or point at more peers")
        self.missing = missing


@dataclass(frozen=True)
class SpanInfo:
    """What routing needs to know of one server."""

    peer: str  # endpoint
    start: int
    end: int
    load: float = 0.0  # lower is better (queued requests, later measured latency)


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


def plan_chain(spans: Sequence[SpanInfo], start: int, end: int) -> list[Hop]:
    """Fewest hops covering [start, end): at each block, the server that reaches furthest (then the least loaded)."""
    missing = missing_ranges(spans, start, end)
    if missing:
        raise MissingBlocks(missing, [(s.start, s.end) for s in spans])
    chain: list[Hop] = []
    position = start
    while position < end:
        candidates = [s for s in spans if s.start <= position < s.end]
        best = min(candidates, key=lambda s: (-min(s.end, end), s.load, s.peer))
        stop = min(best.end, end)
        chain.append(Hop(best.peer, position, stop))
        position = stop
    return chain
