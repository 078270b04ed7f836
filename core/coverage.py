"""Block coverage of a model by the servers in a snapshot of the swarm: pure functions over records.

Used by `swarm status` (gaps and weak blocks at a glance) and by anything that needs the swarm's bottleneck: the
throughput of a model is limited by its least-served block.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..transport.records import ServerRecord

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
