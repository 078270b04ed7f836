"""The BLOOM family: BloomForCausalLM (bigscience/bloom, bloom-560m ... bloom-7b1, BLOOMZ).

Blocks are transformers' own `BloomBlock`s, built through their public constructor. BLOOM's attention takes an ALiBi
bias instead of rotary positions and does not call transformers' attention interface, so this module runs a block
itself from its public submodules: `input_layernorm`, `self_attention.query_key_value` (the fused query/key/value
projection, which LoRA may target), attention per segment of the pass over that request's own keys (its cache's, for
a session), `self_attention.dense`, `post_attention_layernorm` and `mlp`, with the residuals taken after or before the
layer norms as `apply_residual_connection_post_layernorm` says. The arithmetic is BLOOM's: scores
`alibi + (q k^T) / sqrt(head_dim)`, plus the causal mask, softmax in float32.

ALiBi is computed here, once per pass and segment, as BLOOM computes it: key j of a row gets the bias
`slope_h * p_j`, where p_j counts the row's real tokens before key j (the cumulative sum of the padding mask, minus
one; padding gets 0 and is masked anyway). The same bias goes to every query (softmax ignores the per-query constant
that a relative distance would add), so padding changes the bias exactly as it does in transformers.

The client holds `word_embeddings`, `word_embeddings_layernorm` (the family's input norm: soft prompts are put in
front of the embeddings before it, as transformers applies it to `inputs_embeds`), `ln_f`, and the LM head, tied to
the embeddings. Checkpoints name blocks `transformer.h.N.` (BloomForCausalLM's `save_pretrained`) or `h.N.` (the
hub's BLOOM checkpoints, saved from BloomModel); `base_model_prefix` lets weight loading read both.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...transport.errors import ConfigError
from .base import ClientPrefixes, ModelFamily, PassContext, Segment, causal_mask


def alibi_slopes(heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """ALiBi's per-head slopes [heads] (float32): for the largest power of two n <= heads, (2^(-8/n))^i for
    i = 1..n; the remaining heads take the odd powers of 2^(-4/n) (the slopes of 2n heads that n heads lack)."""
    n = 2 ** math.floor(math.log2(heads))
    base = torch.tensor(2.0 ** (-8.0 / n), dtype=torch.float32, device=device)
    slopes = torch.pow(base, torch.arange(1, n + 1, dtype=torch.int32, device=device))
    if n < heads:
        extra = torch.tensor(2.0 ** (-4.0 / n), dtype=torch.float32, device=device)
        powers = torch.arange(1, 1 + 2 * min(n, heads - n), 2, dtype=torch.int32, device=device)
        slopes = torch.cat([slopes, torch.pow(extra, powers)])
    return slopes


def segment_alibi(slopes: torch.Tensor, key_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ALiBi bias [rows * heads, 1, keys] of a segment whose key slots hold real tokens where `key_valid`
    [rows, keys] is True: slope_h times the key's count of real tokens before it."""
    valid = key_valid.long()
    positions = (valid.cumsum(dim=-1) - 1) * valid
    alibi = slopes[None, :, None] * positions[:, None, :]
    return alibi.reshape(-1, 1, key_valid.shape[1]).to(dtype)


class _Heads(nn.Module):
    """What the blocks of a span share: the head count, for the ALiBi slopes (no tensors: a span's dtype never
    rounds the slopes, which are computed in float32 for each pass)."""

    def __init__(self, heads: int):
        super().__init__()
        self.heads = heads


class BloomFamily(ModelFamily):
    name = "bloom"
    architectures = ("BloomForCausalLM", "BloomModel")
    model_types = ("bloom",)
    base_model_prefix = "transformer."
    lora_targets = ("query_key_value",)  # PEFT's default for BLOOM

    def block_prefix(self, config: Any, index: int) -> str:
        return f"transformer.h.{index}."

    def client_prefixes(self, config: Any) -> ClientPrefixes:
        return ClientPrefixes(embed="transformer.word_embeddings.", norm="transformer.ln_f.", lm_head="lm_head.",
                              input_norm="transformer.word_embeddings_layernorm.")

    def build_block(self, config: Any, index: int) -> nn.Module:
        from transformers.models.bloom.modeling_bloom import BloomBlock

        if getattr(config, "pretraining_tp", 1) > 1 and getattr(config, "slow_but_exact", False):
            raise ConfigError("this BLOOM config sets slow_but_exact with pretraining_tp > 1 (a training-time "
                              "emulation of tensor parallelism); swarm serves BLOOM with slow_but_exact false, as "
                              "every released BLOOM checkpoint is")
        return BloomBlock(config, layer_idx=index)

    def build_shared(self, config: Any) -> nn.Module:
        return _Heads(int(config.n_head))

    def attention_implementation(self) -> str | None:
        return None  # BLOOM's attention never reads it: run_block computes attention itself

    def pass_inputs(self, shared: nn.Module, hidden: torch.Tensor, context: PassContext) -> dict[str, Any]:
        """Per segment of the pass: its ALiBi bias and its causal mask (which keys each new token sees)."""
        slopes = alibi_slopes(shared.heads, hidden.device)
        return {"alibi": [segment_alibi(slopes, s.key_valid, context.dtype) for s in context.segments],
                "masks": [causal_mask(s.key_valid, s.query_slots, None, context.dtype) for s in context.segments]}

    def run_block(self, block: nn.Module, index: int, hidden: torch.Tensor, context: PassContext) -> torch.Tensor:
        """BloomBlock's forward, with attention per segment over each request's own keys."""
        attention = block.self_attention
        normed = block.input_layernorm(hidden)
        residual = normed if block.apply_residual_connection_post_layernorm else hidden
        tokens = hidden.shape[1]
        fused = attention.query_key_value(normed).view(1, tokens, attention.num_heads, 3, attention.head_dim)
        query, key, value = (fused[..., i, :].transpose(1, 2) for i in range(3))  # [1, heads, tokens, head_dim]
        if context.cache is not None:
            context.cache.update(key, value, index)
        parts = [_attend(attention, query, key, value, segment, index, alibi, mask)
                 for segment, alibi, mask in zip(context.segments, context.inputs["alibi"], context.inputs["masks"],
                                                 strict=True)]
        attended = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        attention_out = residual + attention.dense(attended)
        normed = block.post_attention_layernorm(attention_out)
        residual = normed if block.apply_residual_connection_post_layernorm else attention_out
        return block.mlp(normed, residual)

    def kv_shape(self, config: Any) -> tuple[int, int]:
        return int(config.n_head), int(config.hidden_size) // int(config.n_head)

    def build_client_modules(self, config: Any) -> tuple[nn.Module, nn.Module, nn.Module]:
        embed = nn.Embedding(config.vocab_size, config.hidden_size)
        norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        return embed, norm, lm_head

    def build_input_norm(self, config: Any) -> nn.Module:
        return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)


def _attend(attention: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segment: Segment,
            index: int, alibi: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One segment's attention output [1, rows * new, hidden], over its cache (already holding its new keys) or, for a
    request without one, over its new keys only."""
    q = segment.tokens(query)  # [rows, heads, new, head_dim]
    if segment.cache is None:
        k, v = segment.tokens(key), segment.tokens(value)
    else:
        kv = segment.cache.layers[index]
        k, v = kv.key[:, :, :segment.keys], kv.value[:, :, :segment.keys]
    rows, heads, new, head_dim = q.shape
    keys = k.shape[2]
    scores = alibi.baddbmm(q.reshape(rows * heads, new, head_dim),
                           k.reshape(rows * heads, keys, head_dim).transpose(1, 2),
                           beta=attention.beta, alpha=attention.inv_norm_factor)
    weights = scores.view(rows, heads, new, keys) + mask
    probs = torch.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.bmm(probs.view(rows * heads, new, keys), v.reshape(rows * heads, keys, head_dim))
    return out.view(rows, heads, new, head_dim).permute(0, 2, 1, 3).reshape(1, rows * new, heads * head_dim)
