"""The Llama family: LlamaForCausalLM, and MistralForCausalLM / Qwen2ForCausalLM whose blocks have the same shape.

Blocks are transformers' own decoder layers built through their public constructors. Rotary position embeddings
are computed here once per pass from each token's position id (`PassContext.positions`), with the family's rotary
module; causal masks come from the pass context, built by the generic block runtime from `attention_window`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .base import ClientPrefixes, ModelFamily, PassContext


@dataclass(frozen=True)
class _Classes:
    layer: type[nn.Module]
    rotary: type[nn.Module]
    norm: type[nn.Module]


def _classes(config: Any) -> _Classes:
    model_type = getattr(config, "model_type", "llama")
    if model_type == "mistral":
        from transformers.models.mistral import modeling_mistral as m

        return _Classes(m.MistralDecoderLayer, m.MistralRotaryEmbedding, m.MistralRMSNorm)
    if model_type == "qwen2":
        from transformers.models.qwen2 import modeling_qwen2 as m

        return _Classes(m.Qwen2DecoderLayer, m.Qwen2RotaryEmbedding, m.Qwen2RMSNorm)
    from transformers.models.llama import modeling_llama as m

    return _Classes(m.LlamaDecoderLayer, m.LlamaRotaryEmbedding, m.LlamaRMSNorm)


class _Rotary(nn.Module):
    """Holds the family's rotary module for a span; shared by all its blocks."""

    def __init__(self, rotary: nn.Module):
        super().__init__()
        self.rotary = rotary


class LlamaFamily(ModelFamily):
    name = "llama"
    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
    model_types = ("llama", "mistral", "qwen2")

    def block_prefix(self, config: Any, index: int) -> str:
        return f"model.layers.{index}."

    def client_prefixes(self, config: Any) -> ClientPrefixes:
        return ClientPrefixes(embed="model.embed_tokens.", norm="model.norm.", lm_head="lm_head.")

    def build_block(self, config: Any, index: int) -> nn.Module:
        return _classes(config).layer(config, index)

    def build_shared(self, config: Any) -> nn.Module:
        return _Rotary(_classes(config).rotary(config=config))

    def pass_inputs(self, shared: nn.Module, hidden: torch.Tensor, context: PassContext) -> dict[str, Any]:
        cos, sin = shared.rotary(hidden, context.positions)
        return {"position_embeddings": (cos, sin), "position_ids": context.positions}

    def kv_shape(self, config: Any) -> tuple[int, int]:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return int(config.num_key_value_heads or config.num_attention_heads), int(head_dim)

    def attention_window(self, config: Any, index: int) -> int | None:
        window = getattr(config, "sliding_window", None)
        if not window:
            return None
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:  # Qwen2: per-layer choice
            return int(window) if layer_types[index] == "sliding_attention" else None
        if getattr(config, "use_sliding_window", True) is False:
            return None
        return int(window)

    def build_client_modules(self, config: Any) -> tuple[nn.Module, nn.Module, nn.Module]:
        embed = nn.Embedding(config.vocab_size, config.hidden_size, getattr(config, "pad_token_id", None))
        norm = _classes(config).norm(config.hidden_size, eps=config.rms_norm_eps)
        lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        return embed, norm, lm_head
