"""The Falcon family: FalconForCausalLM, in both of its decoder architectures.

- the new one (`new_decoder_architecture`, falcon-40b/180b): `num_kv_heads` grouped key/value heads, attention and
  MLP in parallel, each with its own layer norm (`num_ln_in_parallel_attn` 2) or sharing one (1);
- the old one (falcon-7b): one key/value head (`multi_query`) or one per query head, attention and MLP in parallel
  (`parallel_attn`) with one layer norm, or one after the other with two.

Blocks are transformers' own `FalconDecoderLayer`s built through their public constructor. Falcon's attention does
not go through transformers' attention interface (it computes attention itself, over a cache it updates itself), so
`run_block` runs the layer from its public submodules: its layer norms, the fused `query_key_value` projection, the
`dense` output projection and the MLP, with attention per request of the pass (`swarm_attention`, over each
request's own cache). The linear layers are called as modules, so adapters' hooks see them as in any other family.

The fused projection packs, for each of the `kv` key/value heads, its `g = heads / kv` query heads, then its key,
then its value; the three layouts (`kv` = num_kv_heads, 1, or heads) are one split. The attention cache holds the
`kv` heads (`kv_shape`); transformers' own cache holds the new architecture's keys broadcast to every query head.
Positions are computed once per pass (`pass_inputs`): rotary embeddings from each token's position id or, for ALiBi
models (`alibi`, falcon-rw), each request's additive attention bias, built with transformers' own
`build_alibi_tensor` from the request's real keys (so padding and cached keys count as in transformers), scaled and
masked as `FalconModel` does; such a bias is one [rows, heads, new, keys] tensor per request and pass, as big as the
one transformers builds.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...transport.errors import ConfigError
from .attention import swarm_attention
from .base import ClientPrefixes, ModelFamily, PassContext, Segment, causal_mask


def _falcon() -> Any:
    from transformers.models.falcon import modeling_falcon

    return modeling_falcon


@dataclass(frozen=True)
class _Heads:
    """What per-segment attention reads of the attention it runs for (in place of a transformers attention module):
    the block's number, for its cache, and how many query heads share each key/value head."""

    layer_idx: int
    num_key_value_groups: int
    is_causal: bool = True


class _Positions(nn.Module):
    """What a span's blocks share: Falcon's rotary module, or (ALiBi models) what their biases need."""

    def __init__(self, config: Any):
        super().__init__()
        self.alibi = bool(config.alibi)
        self.heads = int(config.num_attention_heads)
        self.head_dim = int(config.hidden_size // self.heads)
        self.rotary = None if self.alibi else _falcon().FalconRotaryEmbedding(config=config)


def alibi_bias(segment: Segment, heads: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask [rows, heads, new, keys] of one request of an ALiBi Falcon: transformers' ALiBi of
    its real keys, divided by sqrt(head_dim), and the lowest value where its causal mask hides a key."""
    alibi = _falcon().build_alibi_tensor(segment.key_valid.long(), heads, dtype)
    alibi = alibi.view(segment.rows, heads, 1, segment.keys) / math.sqrt(head_dim)
    hidden = causal_mask(segment.key_valid, segment.query_slots, None, dtype) < 0
    return alibi.masked_fill(hidden, torch.finfo(dtype).min)


def _kv_heads(config: Any) -> int:
    if config.new_decoder_architecture:
        return int(config.num_kv_heads)
    return 1 if config.multi_query else int(config.num_attention_heads)


def split_qkv(fused: torch.Tensor, heads: int, kv: int, head_dim: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Falcon's fused projection [1, tokens, kv * (heads / kv + 2) * head_dim] -> queries [1, heads, tokens, dim],
    keys and values [1, kv, tokens, dim]."""
    tokens = fused.shape[1]
    groups = heads // kv
    qkv = fused.view(1, tokens, kv, groups + 2, head_dim)
    query = qkv[:, :, :, :groups].reshape(1, tokens, heads, head_dim).transpose(1, 2)
    key = qkv[:, :, :, groups].transpose(1, 2)
    value = qkv[:, :, :, groups + 1].transpose(1, 2)
    return query, key, value


class FalconFamily(ModelFamily):
    name = "falcon"
    architectures = ("FalconForCausalLM",)
    model_types = ("falcon",)
    lora_targets = ("query_key_value",)  # PEFT's default for Falcon

    def check_config(self, config: Any) -> None:
        heads, kv = int(config.num_attention_heads), _kv_heads(config)
        if kv < 1 or heads % kv or config.hidden_size % heads:
            raise ConfigError(f"this Falcon config is inconsistent: {heads} attention heads cannot share "
                              f"{kv} key/value heads, or hidden size {config.hidden_size} is not a multiple of them")
        if not config.new_decoder_architecture and not config.multi_query and int(config.num_kv_heads) != heads:
            raise ConfigError(f"this Falcon config gives num_kv_heads={config.num_kv_heads} to the old decoder "
                              "architecture without multi_query, whose projection has one key/value head per "
                              f"attention head ({heads}); transformers cannot run it either")
        if config.new_decoder_architecture and not config.parallel_attn:
            raise ConfigError("this Falcon config has new_decoder_architecture with parallel_attn=false, which "
                              "transformers' Falcon layer cannot run; the new architecture is parallel")
        if not config.new_decoder_architecture and config.parallel_attn and config.num_ln_in_parallel_attn == 2:
            raise ConfigError("this Falcon config asks for two layer norms (num_ln_in_parallel_attn=2) in the old "
                              "decoder architecture, which transformers' Falcon layer cannot run")

    def block_prefix(self, config: Any, index: int) -> str:
        return f"transformer.h.{index}."

    def client_prefixes(self, config: Any) -> ClientPrefixes:
        return ClientPrefixes(embed="transformer.word_embeddings.", norm="transformer.ln_f.", lm_head="lm_head.")

    def build_block(self, config: Any, index: int) -> nn.Module:
        config = copy.copy(config)  # the layer sets num_ln_in_parallel_attn on its config: not on the caller's
        config._attn_implementation = "sdpa"  # picks the layer's attention class; run_block computes attention
        return _falcon().FalconDecoderLayer(config, index)

    def build_shared(self, config: Any) -> nn.Module:
        return _Positions(config)

    def pass_inputs(self, shared: nn.Module, hidden: torch.Tensor, context: PassContext) -> dict[str, Any]:
        if shared.alibi:
            return {"alibi": [alibi_bias(s, shared.heads, shared.head_dim, context.dtype) for s in context.segments]}
        cos, sin = shared.rotary(hidden, context.positions)
        return {"position_embeddings": (cos, sin)}

    def attention_implementation(self) -> str | None:
        return None  # Falcon's attention does not call the attention interface: run_block does it per segment

    def kv_shape(self, config: Any) -> tuple[int, int]:
        return _kv_heads(config), int(config.hidden_size // config.num_attention_heads)

    def run_block(self, block: nn.Module, index: int, hidden: torch.Tensor, context: PassContext) -> torch.Tensor:
        """The layer's computation, as transformers' `FalconDecoderLayer.forward` does it (additions in the same
        order), with attention per request of the pass. The layout is read off the layer's submodules: `ln_attn`
        and `ln_mlp` (two norms, parallel), `post_attention_layernorm` (sequential), else one norm, parallel."""
        two_norms = hasattr(block, "ln_attn")
        attn_in = block.ln_attn(hidden) if two_norms else block.input_layernorm(hidden)
        attention = self._attention(block.self_attention, index, attn_in, context)
        if hasattr(block, "post_attention_layernorm"):  # attention, then the MLP
            residual = hidden + attention
            return residual + block.mlp(block.post_attention_layernorm(residual))
        mlp_in = block.ln_mlp(hidden) if two_norms else attn_in
        return hidden + (block.mlp(mlp_in) + attention)

    def _attention(self, module: nn.Module, index: int, hidden: torch.Tensor, context: PassContext) -> torch.Tensor:
        """Falcon's attention over the packed pass [1, tokens, hidden]: each request attends over its own keys."""
        config = module.config
        heads, kv = int(config.num_attention_heads), _kv_heads(config)
        head_dim = int(config.hidden_size // heads)
        query, key, value = split_qkv(module.query_key_value(hidden), heads, kv, head_dim)
        biases = context.inputs.get("alibi")
        if biases is None:
            cos, sin = context.inputs["position_embeddings"]
            query, key = _falcon().apply_rotary_pos_emb(query, key, cos, sin)
        if context.cache is not None:
            context.cache.update(key, value, index)
        if biases is None:
            out, _ = swarm_attention(_Heads(index, heads // kv), query, key, value, None, swarm_pass=context)
        else:
            out = _biased_attention(index, query, key, value, context, biases)
        return module.dense(out.reshape(1, out.shape[1], heads * head_dim))

    def build_client_modules(self, config: Any) -> tuple[nn.Module, nn.Module, nn.Module]:
        embed = nn.Embedding(config.vocab_size, config.hidden_size)
        norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        return embed, norm, lm_head


def _biased_attention(index: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, context: PassContext,
                      biases: list[torch.Tensor]) -> torch.Tensor:
    """Attention of each request of the pass over its own keys (its cache's, or its new ones) with its own additive
    mask (`alibi_bias`), as transformers' Falcon runs SDPA with ALiBi -> [1, tokens, heads, dim]."""
    outs = []
    for segment, bias in zip(context.segments, biases, strict=True):
        q = segment.tokens(query)
        if segment.cache is None:
            k, v = segment.tokens(key), segment.tokens(value)
        else:
            kv = segment.cache.layers[index]
            k, v = kv.key[:, :, :segment.keys], kv.value[:, :, :segment.keys]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                               enable_gqa=q.shape[1] != k.shape[1])
        outs.append(out.transpose(1, 2).reshape(1, segment.rows * segment.new, out.shape[1], out.shape[-1]))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
