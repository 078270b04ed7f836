"""Attention over each request's own keys inside a packed pass, as a transformers attention implementation.

A pass packs several requests' new tokens into one sequence, so the blocks' linear layers run once for all of them.
Attention must not mix requests: `swarm_attention` (registered in transformers' `AttentionInterface` under "swarm")
cuts the packed queries into the pass's segments and runs transformers' own SDPA attention per segment, over the
segment's cache (already updated with its new keys by `PassCache.update`) or, without a cache, over its new keys
only, with the segment's own causal mask. A segment computes exactly what it would alone.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .base import PassContext

NAME = "swarm"


def swarm_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    swarm_pass: PassContext | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query [1, heads, tokens, dim], key/value [1, kv_heads, tokens, dim] (the pass's new tokens) ->
    [1, tokens, heads, dim]."""
    if swarm_pass is None:  # called outside a swarm pass (a plain transformers call): ordinary SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
    layer = getattr(module, "layer_idx", None)
    window = swarm_pass.windows.get(layer) if layer is not None else None
    outs = []
    for segment in swarm_pass.segments:
        q = segment.tokens(query)
        if segment.cache is None:
            k, v = segment.tokens(key), segment.tokens(value)
        else:
            kv = segment.cache.layers[layer]
            end = segment.keys
            k, v = kv.key[:, :, :end], kv.value[:, :, :end]
        out, _ = sdpa_attention_forward(module, q, k, v, segment.mask(window), dropout=dropout, scaling=scaling)
        outs.append(out.reshape(1, segment.rows * segment.new, *out.shape[2:]))  # [rows, new, heads, dim] packed
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), None


AttentionInterface.register(NAME, swarm_attention)
