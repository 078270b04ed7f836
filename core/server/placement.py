"""How many blocks a server holds, from the memory it may use; and the options that say so.

A server started without `--blocks` first decides how many blocks it can hold (`blocks_for_memory`), then which
ones (core/balance.py's `choose_span`, over the swarm's signed records). The count is plain arithmetic over figures
read from the model's config, without loading a weight:

    per block = weights of one block in the chosen dtype (its parameters, counted on a block built on the meta
                device) + the attention cache of one block for the whole `--cache-tokens` budget
    blocks    = min(the model's blocks, floor((memory - reserve) / per block))

A block's weights are counted as they will be held: with `--quant int8` or `nf4`, its linear layers in 8 or 4 bits
with their scales (quant/weights.py's `planned_bytes`), the rest in the dtype.

`reserve` is what the process needs besides the blocks (the shared modules, activations of one pass, the
interpreter and torch themselves): a fixed `RESERVE_BYTES` plus one block's weights, so that a pass never meets a
full memory. The memory is `--max-memory` when given, else a safe share of what is free: `RAM_SHARE` of the
available RAM (others on the machine, the OS's file cache and a client may need the rest) or `GPU_SHARE` of the free
memory of the GPU.

`--quant auto` (`choose_quant`) takes the least compression that makes the blocks the server is asked for fit in that
memory: `none` when they fit in the dtype, else `int8`, else `nf4`; the blocks asked for are the span of `--blocks`,
else `--num-blocks`, else the whole model (a server that is told nothing aims to hold the model alone). When not even
nf4 holds them, nf4, which holds the most blocks.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from ...quant.weights import MODES, planned_bytes
from ...transport.errors import ConfigError
from .cache import SessionCache

RAM_SHARE = 0.5  # of the available RAM a server takes by default
GPU_SHARE = 0.8  # of the free GPU memory
RESERVE_BYTES = 256 << 20  # the process's own needs besides its blocks (torch, buffers of a pass)

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_MEMORY = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*")


@dataclass(frozen=True)
class BalanceSettings:
    """How a server without `--blocks` chooses its span and moves (the policy itself is core/balance.py's)."""

    rebalance: bool = True  # False (--no-rebalance): choose a span at start, never move
    period: float = 60.0  # seconds between balance checks (each jittered by +-20%)
    quality: float = 0.9  # --balance-quality: move only when the swarm's bottleneck would be below this share of
    #                         what the move reaches (see core/balance.py)
    min_interval: float = 300.0  # seconds at least between two moves of this server
    confirmations: int = 2  # checks in a row that must ask for the same move (hysteresis)
    listen: float | None = None  # seconds to listen to the swarm before choosing (None: 3 gossip periods), x1..1.5
    drain: float = 30.0  # seconds a move waits for running sessions before closing them (clients replay)

    def __post_init__(self) -> None:
        for ok, message in ((self.period > 0, f"--balance-period must be more than 0, got {self.period}"),
                            (0 < self.quality <= 1, f"--balance-quality must be in (0, 1], got {self.quality}"),
                            (self.min_interval >= 0, f"--min-move-interval must be 0 or more, got {self.min_interval}"),
                            (self.confirmations >= 1, f"confirmations must be 1 or more, got {self.confirmations}"),
                            (self.listen is None or self.listen >= 0, f"listen must be 0 or more, got {self.listen}"),
                            (self.drain >= 0, f"--move-drain must be 0 or more, got {self.drain}")):
            if not ok:
                raise ConfigError(message)


def parse_memory(text: str) -> int:
    """Bytes from `4GiB`, `512MiB`, `8GB`, `1.5g` or a plain number of bytes; ConfigError on anything else."""
    match = _MEMORY.fullmatch(text or "")
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ConfigError(f"--max-memory must be a size like 4GiB, 512MiB or 8GB, got {text!r}")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConfigError(f"--max-memory must be more than 0, got {text!r}")
    return value


def parse_throughput(text: str) -> str | float:
    """`auto`, `eval`, or a positive number of tokens/s; ConfigError on anything else."""
    value = (text or "").strip().lower()
    if value in ("auto", "eval"):
        return value
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise ConfigError(f"--throughput must be auto, eval or a positive number of tokens/s, got {text!r}")
    return number


QUANT_OPTIONS = (*MODES, "auto")  # --quant's values


def parse_quant(text: str) -> str:
    """`none`, `int8`, `nf4` or `auto` (any case); ConfigError on anything else."""
    value = (text or "").strip().lower()
    if value not in QUANT_OPTIONS:
        raise ConfigError(f"--quant must be one of {', '.join(QUANT_OPTIONS)}, got {text!r}")
    return value


def available_memory(device: str = "cpu") -> int:
    """The memory a server may use when not told: a share of the free GPU memory, or of the available RAM."""
    if device.startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * GPU_SHARE)
    import psutil

    return int(psutil.virtual_memory().available * RAM_SHARE)


@dataclass(frozen=True)
class BlockCost:
    """What one block of a model costs in memory, in one dtype and weight quantization."""

    weights: int  # bytes of one block's parameters and buffers (the largest block's, when they differ)
    cache_per_token: int  # bytes of attention cache one block holds per cached token

    def per_block(self, cache_tokens: int) -> int:
        """Bytes one held block takes: its weights and its share of a `cache_tokens` budget."""
        return self.weights + self.cache_per_token * cache_tokens


def block_cost(family: Any, config: Any, dtype: torch.dtype, quant: str = "none") -> BlockCost:
    """`BlockCost` of a model from its config, its linear layers quantized as `quant`: blocks built on the meta
    device (no memory, no weights read)."""
    if quant not in MODES:
        raise ConfigError(f"weight quantization must be one of {', '.join(MODES)}, got {quant!r}")
    total = family.num_blocks(config)
    # blocks of a family differ only by their attention windows, never by their weights: counting the first and
    # the last is enough to catch a model whose blocks differ anyway
    weights = 0
    for index in sorted({0, total - 1}):
        with torch.device("meta"):
            block = family.build_block(config, index)
        weights = max(weights, planned_bytes(block, quant, dtype))
    kv_heads, head_dim = family.kv_shape(config)
    return BlockCost(weights, SessionCache.bytes_per_token(1, kv_heads, head_dim, dtype))


def blocks_for_memory(memory: int, cost: BlockCost, cache_tokens: int, num_blocks: int) -> int:
    """How many blocks fit in `memory` bytes with a `cache_tokens` budget (at most the model's `num_blocks`);
    ConfigError when not even one does."""
    usable = memory - RESERVE_BYTES - cost.weights
    per_block = cost.per_block(cache_tokens)
    count = min(num_blocks, usable // per_block if usable > 0 else 0)
    if count < 1:
        need = RESERVE_BYTES + cost.weights + per_block
        raise ConfigError(f"{_size(memory)} of memory holds no block of this model: one block needs "
                          f"{_size(per_block)} ({_size(cost.weights)} of weights and {_size(per_block - cost.weights)}"
                          f" of attention cache for {cache_tokens} tokens) and the server {_size(need - per_block)} "
                          f"besides; give more --max-memory, or fewer --cache-tokens")
    return int(count)


def choose_quant(memory: int, costs: dict[str, BlockCost], cache_tokens: int, wanted: int) -> str:
    """`--quant auto`: the first of none, int8, nf4 (in `costs`, each mode's BlockCost) with which `wanted` blocks
    and their cache budget fit in `memory` bytes; nf4 (the most blocks) when none does."""
    for mode in MODES:
        cost = costs[mode]
        if RESERVE_BYTES + cost.weights + wanted * cost.per_block(cache_tokens) <= memory:
            return mode
    return MODES[-1]


def fits_both(memory: int, cost: BlockCost, cache_tokens: int, held: int, new: int) -> bool:
    """Whether `new` blocks (and their cache budget) can be loaded while `held` blocks (and theirs) are still in
    memory: a move that loads its new span before freeing the old one."""
    return RESERVE_BYTES + cost.weights + (held + new) * cost.per_block(cache_tokens) <= memory


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


__all__ = ["QUANT_OPTIONS", "BalanceSettings", "BlockCost", "available_memory", "block_cost", "blocks_for_memory",
           "choose_quant", "fits_both", "parse_memory", "parse_quant", "parse_throughput"]
