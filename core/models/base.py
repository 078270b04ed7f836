"""The interface of a model family: how its blocks are built and fed, and which tensors the client needs.

Generic code (weight loading, the server's block runtime, the client) talks to a family only through `ModelFamily`.
A family module describes:
- where block i's tensors live in a checkpoint, and how to build block i from the config;
- what the blocks need besides hidden states (rotary position embeddings, alibi, ...), computed once per step;
- the attention-cache layout of a block (key/value heads and head size) and its attention window;
- the client's modules: input embeddings, final norm, LM head.
Adding a family is one more module that subclasses `ModelFamily` and registers itself in `core/models/__init__.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ClientPrefixes:
    """Checkpoint prefixes of the modules a client holds (the LM head falls back to the embeddings when tied)."""

    embed: str
    norm: str
    lm_head: str
    score: str = "score."  # a sequence-classification head, when the checkpoint has one


class ModelFamily:
    """Base class of model families. Subclasses fill in the class attributes and the methods below."""

    name: str = ""
    architectures: tuple[str, ...] = ()  # `config.architectures` values this family serves
    model_types: tuple[str, ...] = ()  # `config.model_type` values, for configs that name no architecture

    def num_blocks(self, config: Any) -> int:
        return int(config.num_hidden_layers)

    def block_prefix(self, config: Any, index: int) -> str:
        """Checkpoint key prefix of block `index` (with the trailing dot)."""
        raise NotImplementedError

    def client_prefixes(self, config: Any) -> ClientPrefixes:
        raise NotImplementedError

    def build_block(self, config: Any, index: int) -> nn.Module:
        """An uninitialised block `index` (tensors are assigned from the checkpoint afterwards)."""
        raise NotImplementedError

    def build_shared(self, config: Any) -> nn.Module:
        """A module holding what all blocks of a span share (e.g. rotary frequencies); may be empty."""
        return nn.Module()

    def block_inputs(self, shared: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict[str, Any]:
        """Keyword arguments every block gets for this step besides hidden states, mask and cache."""
        return {}

    def run_block(self, block: nn.Module, hidden: torch.Tensor, mask: torch.Tensor, inputs: dict[str, Any],
                  cache: Any | None) -> torch.Tensor:
        """Apply one block. `mask` is additive, [batch, 1, new, cached+new]; `cache` has `update(k, v, layer_idx)`."""
        out = block(hidden, attention_mask=mask, past_key_values=cache, **inputs)
        return out[0] if isinstance(out, tuple) else out

    def kv_shape(self, config: Any) -> tuple[int, int]:
        """(key/value heads, head size) of one block's attention cache."""
        raise NotImplementedError

    def attention_window(self, config: Any, index: int) -> int | None:
        """Sliding attention window of block `index`, or None for full causal attention."""
        return None

    def build_client_modules(self, config: Any) -> tuple[nn.Module, nn.Module, nn.Module]:
        """(input embeddings, final norm, LM head), uninitialised."""
        raise NotImplementedError

    def checkpoint_names(self, config: Any) -> list[str]:
        """Every tensor name a checkpoint of this model has (read off the modules, built on the meta device)."""
        prefixes = self.client_prefixes(config)
        with torch.device("meta"):
            embed, norm, lm_head = self.build_client_modules(config)
            modules = [(prefixes.embed, embed), (prefixes.norm, norm), (prefixes.lm_head, lm_head)]
            modules += [(self.block_prefix(config, i), self.build_block(config, i))
                        for i in range(self.num_blocks(config))]
        return [prefix + name for prefix, module in modules for name in module.state_dict()]
