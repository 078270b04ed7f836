"""Block coverage of a model by the servers in a snapshot of the swarm: pure functions over records.

Used by `swarm status` (gaps and weak blocks at a glance) and by anything that needs the swarm's bottleneck: the
throughput of a model is limited by its least-served block. What else `swarm status` needs, kept here because it is
pure: a record's age (`record_age`: our clock once we saw the record's seq advance, its owner's clock before that)
and whether it is suspected, block ranges and the weakest blocks, a strip of per-block values folded to a width, and
`MoveLog`, which notes servers seen serving another span than at the previous snapshot.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..transport.records import ServerRecord

if TYPE_CHECKING:  # the command line imports this module: no ZeroMQ at import time
    from ..transport.gossip import Heard

SERVING_STATES = ("online", "joining")


@dataclass(frozen=True)
class BlockCoverage:
    block: int
    servers: int  # serving servers that hold this block
    throughput: float  # sum of their throughputs


@dataclass(frozen=True)
class ModelCoverage:
    model: str
    num_blocks: int
    blocks: tuple[BlockCoverage, ...]

    @property
    def missing(self) -> list[tuple[int, int]]:
        """Half-open ranges of blocks that no serving server holds."""
        gaps: list[tuple[int, int]] = []
        for b in self.blocks:
            if b.servers:
                continue
            if gaps and gaps[-1][1] == b.block:
                gaps[-1] = (gaps[-1][0], b.block + 1)
            else:
                gaps.append((b.block, b.block + 1))
        return gaps

    @property
    def complete(self) -> bool:
        return all(b.servers for b in self.blocks)

    @property
    def bottleneck(self) -> float:
        """Throughput of the least-served block (0 when a block has no server)."""
        return min((b.throughput for b in self.blocks), default=0.0)

    @property
    def weakest(self) -> int | None:
        """The block with the lowest throughput (the first one on ties)."""
        if not self.blocks:
            return None
        return min(self.blocks, key=lambda b: (b.throughput, b.block)).block


def model_coverage(model: str, records: Iterable[ServerRecord]) -> ModelCoverage:
    """Coverage of `model` by the serving records among `records` (other models and states are ignored)."""
    mine = [r for r in records if r.model == model]
    num_blocks = max((r.num_blocks for r in mine), default=0)
    counts = [0] * num_blocks
    speed = [0.0] * num_blocks
    for r in mine:
        if r.state not in SERVING_STATES:
            continue
        for i in range(r.start, min(r.end, num_blocks)):
            counts[i] += 1
            speed[i] += r.throughput
    blocks = tuple(BlockCoverage(i, counts[i], speed[i]) for i in range(num_blocks))
    return ModelCoverage(model, num_blocks, blocks)


def models_served(records: Sequence[ServerRecord]) -> list[str]:
    return sorted({r.model for r in records if r.state in SERVING_STATES})


# -- what `swarm status` adds: a record's age, the weakest blocks, a strip that fits, moves seen ---------------------


@dataclass(frozen=True)
class Age:
    """How old a record is: seconds since its owner published it, as well as we can tell."""

    seconds: float
    source: str  # "heard": since its newest seq reached us (we saw it advance); "clock": from its owner's clock


def record_age(record: ServerRecord, heard: Heard | None, wall_now: float) -> Age:
    """The age of `record` given what our membership table saw of it (`Membership.heard`) and our wall clock.

    Once we have seen a record's seq advance, our own clock is the truth: the newest seq reached us `heard.age`
    seconds ago, at most a gossip hop or two after its owner published it. Before that (a record we heard of only
    once, e.g. a dead server's last record still travelling through the swarm), our clock only knows when *we* first
    heard of it, so the owner's publishing time (`updated_at`, signed with the record) against our wall clock is the
    better guess: skewed by the difference between the two clocks, and never taken as younger than our own count.
    """
    if heard is not None and heard.advanced > 0:
        return Age(heard.age, "heard")
    return Age(max(0.0, wall_now - record.updated_at, 0.0 if heard is None else heard.age), "clock")


def is_suspected(record: ServerRecord, age: Age, suspect_after: float) -> bool:
    """A record still believed (not expired) but silent for longer than `suspect_after`: its server probably died
    without saying so. Offline records are not suspected: their server said it left."""
    return record.state != "offline" and age.seconds > suspect_after


def ranges(blocks: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted block indices as half-open ranges of consecutive blocks: [3, 4, 5, 9] -> [(3, 6), (9, 10)]."""
    found: list[tuple[int, int]] = []
    for b in sorted(set(blocks)):
        if found and found[-1][1] == b:
            found[-1] = (found[-1][0], b + 1)
        else:
            found.append((b, b + 1))
    return found


def weakest_blocks(throughputs: Sequence[float], tolerance: float = 1e-9) -> list[tuple[int, int]]:
    """The ranges of blocks whose throughput is the minimum (within a relative `tolerance`): the bottleneck."""
    if not throughputs:
        return []
    low = min(throughputs)
    return ranges(i for i, t in enumerate(throughputs) if t <= low + tolerance * max(abs(low), 1.0))


def strip_cells(values: Sequence[float], width: int) -> list[tuple[int, int, float]]:
    """`values` (one per block) folded into at most `width` cells of consecutive blocks: (start, end, minimum).

    One cell per block when they fit; otherwise each cell holds ceil(n / width) blocks and shows their minimum, since
    the least-served block of a group is the one that limits the swarm.
    """
    n = len(values)
    if n == 0 or width < 1:
        return []
    per = -(-n // width)
    return [(s, min(s + per, n), min(values[s:s + per])) for s in range(0, n, per)]


@dataclass(frozen=True)
class Move:
    """A server seen serving another span than the last time we looked."""

    peer_id: str
    model: str
    before: tuple[int, int]
    after: tuple[int, int]
    at: float  # wall-clock time we noticed


class MoveLog:
    """Spans seen per server across snapshots, and the last `keep` moves (newest first). Pure: no clock of its own.

    Only servers present in consecutive snapshots count: one that left and came back elsewhere is a new server, and a
    server gone from the snapshot is forgotten, so the table stays as small as the swarm.
    """

    def __init__(self, keep: int = 8):
        self._spans: dict[str, tuple[str, int, int]] = {}
        self._moves: deque[Move] = deque(maxlen=keep)

    def observe(self, records: Iterable[ServerRecord], now: float) -> list[Move]:
        """Note the spans of `records` (one snapshot) and return the moves since the previous snapshot."""
        spans = {r.peer_id: (r.model, r.start, r.end) for r in records if r.state != "offline"}
        moves = [Move(peer, span[0], (old[1], old[2]), (span[1], span[2]), now)
                 for peer, span in sorted(spans.items())
                 if (old := self._spans.get(peer)) is not None and old != span]
        self._spans = spans
        self._moves.extendleft(moves)
        return moves

    @property
    def moves(self) -> list[Move]:
        return list(self._moves)
