"""The interface of a model family: how its blocks are built and fed, and which tensors the client needs.

Generic code (weight loading, the server's block runtime, the client) talks to a family only through `ModelFamily`.
A family module describes:
- where block i's tensors live in a checkpoint, and how to build block i from the config;
- what the blocks need besides hidden states (rotary position embeddings, alibi, ...), computed once per pass from
  the pass's context (`PassContext`: positions, masks, cache view);
- the attention-cache layout of a block (key/value heads and head size) and its attention window;
- the client's modules: input embeddings, final norm, LM head.
Adding a family is one more module that subclasses `ModelFamily` and registers itself in `core/models/__init__.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass
class PassContext:
    """What one pass through a run of blocks gives every block besides hidden states, built by the generic block
    runtime and read by the family module (which decides how its layers consume it).

    - `positions` [batch, new]: position id of each new token (real tokens count up per row; padding gets 1);
    - `key_valid` [batch, keys]: which key slots hold real tokens (cached ones, then the new ones);
    - `query_slots` [new]: the key slot of each new token;
    - `cache`: the blocks' attention cache (`update(key, value, layer_idx)` -> all keys and values so far), or None;
    - `windows`: the attention window of each block of the pass (by its number in the model; None: full causal);
    - `inputs`: what the family computed once for the pass (`ModelFamily.pass_inputs`: rotary embeddings, ...).
    `block_mask(index)` is block `index`'s additive causal mask [batch, 1, new, keys], built once per window and
    pass; a family with alibi reads `positions` and `key_valid` instead.
    """

    positions: torch.Tensor
    key_valid: torch.Tensor
    query_slots: torch.Tensor
    dtype: torch.dtype
    windows: dict[int, int | None] = field(default_factory=dict)
    cache: Any | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict, repr=False)

    def block_mask(self, index: int) -> torch.Tensor:
        window = self.windows.get(index)
        if window not in self._masks:
            self._masks[window] = causal_mask(self.key_valid, self.query_slots, window, self.dtype)
        return self._masks[window]


def causal_mask(valid: torch.Tensor, query_slots: torch.Tensor, window: int | None, dtype: torch.dtype
                ) -> torch.Tensor:
    """Additive mask [batch, 1, queries, keys]: a query sees real keys at its slot or before (within `window`)."""
    key_slots = torch.arange(valid.shape[1], device=valid.device)
    allowed = key_slots[None, :] <= query_slots[:, None]
    if window is not None:
        allowed = allowed & (key_slots[None, :] > query_slots[:, None] - window)
    allowed = allowed[None, :, :] & valid[:, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=valid.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None, :, :]


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

    def pass_inputs(self, shared: nn.Module, hidden: torch.Tensor, context: PassContext) -> dict[str, Any]:
        """What every block of this pass needs besides hidden states, computed once (kept in `context.inputs`)."""
        return {}

    def run_block(self, block: nn.Module, index: int, hidden: torch.Tensor, context: PassContext) -> torch.Tensor:
        """Apply block `index` (its number in the whole model) to `hidden` in the pass described by `context`."""
        out = block(hidden, attention_mask=context.block_mask(index), past_key_values=context.cache, **context.inputs)
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
