"""The Mixtral family: MixtralForCausalLM, a Mistral-style block whose MLP is a sparse mixture of experts.

A block is transformers' own `MixtralDecoderLayer`, built through its public constructor: attention as in Llama
(rotary position embeddings, grouped key/value heads, the config's sliding window), then a router that sends every
token to its top-k experts and sums their outputs by the router's weights. Routing is per token (no expert capacity,
no token dropped), so a pass that packs several requests' tokens gives each token what it gets alone (up to the
rounding of matrix products of other sizes, as for any linear layer). All of a block's experts are one block.

What this module does besides building blocks:
- everything about positions, the attention cache and the client's modules is Llama's (`LlamaFamily`), with Mixtral's
  own rotary and norm classes;
- the experts run with transformers' "grouped_mm" implementation (what transformers itself picks for the model; it
  falls back to one matmul per expert where no grouped kernel exists);
- `block_tensors` converts a block's tensors from the layout checkpoints store to the layer's: the hub's per-expert
  matrices (`block_sparse_moe.experts.E.w1/w2/w3.weight`, `block_sparse_moe.gate.weight`, which transformers'
  `save_pretrained` also writes) become the fused `mlp.experts.gate_up_proj` [experts, 2 x intermediate, hidden]
  and `mlp.experts.down_proj` [experts, hidden, intermediate]; tensors already fused (`save_pretrained(...,
  save_original_format=False)`) are taken as they are.

Adapters: the blocks' linear layers are the attention projections (q_proj, k_proj, v_proj, o_proj); the router and
the experts are parameters, not linear layers, so LoRA on them (PEFT's `target_parameters`) is refused when an adapter
is checked.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn

from ...transport.errors import ConfigError
from .llama import LlamaFamily

EXPERTS_IMPLEMENTATION = "grouped_mm"  # transformers' experts implementation the blocks run with (its default)
HUB_PREFIX = "block_sparse_moe."  # the hub layout's MLP, one matrix per expert
EXPERT_KEY = re.compile(r"block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")


def _modeling() -> Any:
    from transformers.models.mixtral import modeling_mixtral

    return modeling_mixtral


class MixtralFamily(LlamaFamily):
    name = "mixtral"
    architectures = ("MixtralForCausalLM",)
    model_types = ("mixtral",)

    def build_block(self, config: Any, index: int) -> nn.Module:
        layer = _modeling().MixtralDecoderLayer(config, index)
        # the experts read their implementation off their config at each call: theirs is a copy that names it (the
        # span's config, which attention reads, stays shared and unchanged)
        experts = layer.mlp.experts
        experts.config = copy.copy(config)
        experts.config._experts_implementation = (getattr(config, "_experts_implementation", None)
                                                  or EXPERTS_IMPLEMENTATION)
        return layer

    def build_shared(self, config: Any) -> nn.Module:
        shared = nn.Module()
        shared.rotary = _modeling().MixtralRotaryEmbedding(config=config)
        return shared

    def build_client_modules(self, config: Any) -> tuple[nn.Module, nn.Module, nn.Module]:
        embed = nn.Embedding(config.vocab_size, config.hidden_size, getattr(config, "pad_token_id", None))
        norm = _modeling().MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        return embed, norm, lm_head

    def block_tensors(self, config: Any, index: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not any(key.startswith(HUB_PREFIX) for key in tensors):
            return tensors  # already the layer's layout
        if any(key.startswith("mlp.") for key in tensors):
            raise ConfigError(f"block {index} of the checkpoint has both per-expert tensors ({HUB_PREFIX}...) and "
                              "fused ones (mlp...); a checkpoint holds one layout")
        return fuse_experts(tensors, int(config.num_local_experts), int(config.hidden_size),
                            int(config.intermediate_size), index)


def fuse_experts(tensors: dict[str, torch.Tensor], experts: int, hidden: int, intermediate: int, index: int
                 ) -> dict[str, torch.Tensor]:
    """Block `index`'s tensors in the hub layout -> the layer's: per-expert w1 (gate), w3 (up) [intermediate, hidden]
    and w2 (down) [hidden, intermediate] into `mlp.experts.gate_up_proj` and `mlp.experts.down_proj`, the router
    renamed. Each source matrix leaves `tensors` (emptied) as it is copied into the fused ones: converting takes at
    most one block's expert weights more memory, and less as it goes."""
    found: dict[tuple[int, str], str] = {}
    for key in tensors:
        match = EXPERT_KEY.fullmatch(key)
        if match is not None:
            found[(int(match.group(1)), match.group(2))] = key
    extra = sorted(e for e, _ in found if e >= experts)
    if extra:
        raise ConfigError(f"block {index} of the checkpoint has expert {extra[0]}, but the config has {experts} "
                          "experts (num_local_experts)")
    missing = [f"{HUB_PREFIX}experts.{e}.{w}.weight" for e in range(experts) for w in ("w1", "w2", "w3")
               if (e, w) not in found]
    if missing:
        raise ConfigError(f"the checkpoint lacks tensors of block {index}: {', '.join(missing[:5])}"
                          + (" ..." if len(missing) > 5 else ""))
    sample = tensors[found[(0, "w1")]]
    gate_up = torch.empty(experts, 2 * intermediate, hidden, dtype=sample.dtype, device=sample.device)
    down = torch.empty(experts, hidden, intermediate, dtype=sample.dtype, device=sample.device)
    for e in range(experts):
        for w, target, rows in (("w1", gate_up, slice(0, intermediate)), ("w3", gate_up, slice(intermediate, None)),
                                ("w2", down, slice(None))):
            source = tensors.pop(found[(e, w)])
            want = target.shape[1:] if w == "w2" else (intermediate, hidden)
            if tuple(source.shape) != tuple(want):
                raise ConfigError(f"tensor {found[(e, w)]} of block {index} is {list(source.shape)}, but the config "
                                  f"says {list(want)} (hidden_size {hidden}, intermediate_size {intermediate})")
            target[e, rows] = source
    out = {}
    for key in list(tensors):
        value = tensors.pop(key)
        out["mlp." + key[len(HUB_PREFIX):] if key.startswith(HUB_PREFIX) else key] = value
    out["mlp.experts.gate_up_proj"], out["mlp.experts.down_proj"] = gate_up, down
    return out
