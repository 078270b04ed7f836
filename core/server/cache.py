"""Attention-cache memory for inference sessions: a token budget shared by all sessions, and per-session buffers.

The budget counts cache tokens (batch size x max length, for every block a server holds). A session that does not
fit is refused when it opens, before any memory is allocated, so a full server answers "cache full" instead of
running out of memory later. A session's buffers are allocated once at open, at their final size.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch


class CacheBudget:
    """Thread-safe counter of reserved cache tokens."""

    def __init__(self, total_tokens: int):
        self.total = int(total_tokens)
        self._used = 0
        self._lock = threading.Lock()

    @property
    def free(self) -> int:
        with self._lock:
            return self.total - self._used

    def reserve(self, tokens: int) -> bool:
        with self._lock:
            if tokens > self.total - self._used:
                return False
            self._used += tokens
            return True

    def release(self, tokens: int) -> None:
        with self._lock:
            self._used = max(0, self._used - tokens)


@dataclass
class LayerKV:
    key: torch.Tensor  # [batch, kv_heads, max_length, head_dim]
    value: torch.Tensor


class SessionCache:
    """Key/value buffers of one session for a run of blocks, filled left to right.

    A pass writes a step's new keys and values at slots [length, length + new) (`PassCache`); `advance` moves
    `length` forward once every block of the step has run. `valid` marks which slots hold real tokens (padding is
    False), per batch row.
    """

    def __init__(self, layer_indices: list[int], batch: int, max_length: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.batch = batch
        self.max_length = max_length
        self.blocks = (min(layer_indices), max(layer_indices) + 1) if layer_indices else (0, 0)
        self.length = 0
        self.layers = {
            i: LayerKV(torch.zeros(batch, kv_heads, max_length, head_dim, dtype=dtype, device=device),
                       torch.zeros(batch, kv_heads, max_length, head_dim, dtype=dtype, device=device))
            for i in layer_indices
        }
        self.valid = torch.zeros(batch, max_length, dtype=torch.bool, device=device)
        self.tokens_seen = torch.zeros(batch, dtype=torch.long, device=device)  # real tokens so far, per row

    def rewind(self, length: int) -> None:
        """Forget slots from `length` on (to regenerate from an earlier point)."""
        self.valid[:, length:] = False
        self.tokens_seen = self.valid[:, :length].sum(dim=1)
        self.length = length

    def advance(self, new: int) -> None:
        self.length += new

    def nbytes(self) -> int:
        return sum(kv.key.nbytes + kv.value.nbytes for kv in self.layers.values())

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class PassCache:
    """The cache a pass hands to its blocks: `update` writes each session's new keys and values (its part of the
    packed pass) into that session's own buffers, at the slots after what it holds. The attention of the pass
    (`core/models/attention.py`) then reads each session's buffers; `update` returns the packed new keys as they are.
    """

    def __init__(self, caches: list[tuple[SessionCache, Any]]):
        self._caches = caches  # (the session's cache, its Segment in the pass)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: object, **kwargs: object):
        for cache, segment in self._caches:
            kv = cache.layers[layer_idx]
            start, end = cache.length, cache.length + segment.new
            kv.key[:, :, start:end] = segment.tokens(key)
            kv.value[:, :, start:end] = segment.tokens(value)
        return key, value
