"""Attention-cache memory for inference sessions: a token budget shared by all sessions, and per-session buffers.

The budget counts cache tokens (batch size x max length, for every block a server holds). A session that does not
fit is refused when it opens, before any memory is allocated, so a full server answers "cache full" instead of
running out of memory later. A session's buffers are allocated once at open, at their final size.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

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

    Blocks call `update(key, value, layer_idx)` (the transformers Cache method they use): the new keys and values are
    written at slots [length, length + new) and the filled prefix is returned. `advance` moves `length` forward once
    every block of the step has run. `valid` marks which slots hold real tokens (padding is False), per batch row.
    """

    def __init__(self, layer_indices: list[int], batch: int, max_length: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.batch = batch
        self.max_length = max_length
        self.length = 0
        self.layers = {
            i: LayerKV(torch.zeros(batch, kv_heads, max_length, head_dim, dtype=dtype, device=device),
                       torch.zeros(batch, kv_heads, max_length, head_dim, dtype=dtype, device=device))
            for i in layer_indices
        }
        self.valid = torch.zeros(batch, max_length, dtype=torch.bool, device=device)
        self.tokens_seen = torch.zeros(batch, dtype=torch.long, device=device)  # real tokens so far, per row

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: object, **kwargs: object):
        kv = self.layers[layer_idx]
        end = self.length + key.shape[-2]
        kv.key[:, :, self.length:end] = key
        kv.value[:, :, self.length:end] = value
        return kv.key[:, :, :end], kv.value[:, :, :end]

    def rewind(self, length: int) -> None:
        """Forget slots from `length` on (to regenerate from an earlier point)."""
        self.valid[:, length:] = False
        self.tokens_seen = self.valid[:, :length].sum(dim=1)
        self.length = length

    def advance(self, new: int) -> None:
        self.length += new

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
