"""The interface of a model family: how its blocks are built and fed, and which tensors the client needs.

Generic code (weight loading, the server's block runtime, the client) talks to a family only through `ModelFamily`.
A family module describes:
- where block i's tensors live in a checkpoint, how to build block i from the config, and how the tensors a
  checkpoint stores become the block's (`block_tensors`, for a family whose checkpoints keep another layout);
- what the blocks need besides hidden states (rotary position embeddings, alibi, ...), computed once per pass from
  the pass's context (`PassContext`: positions, masks, cache view);
- the attention-cache layout of a block (key/value heads and head size) and its attention window;
- the client's modules: input embeddings (and the norm some families apply to them), final norm, LM head;
- where its tensors live in a checkpoint saved from the base model alone (`base_model_prefix`).
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
    input_norm: str = ""  # a norm the client applies to the input embeddings (`build_input_norm`); "": none


@dataclass
class Segment:
    """One request's share of a pass: `rows` sequences of `new` tokens each, packed one row after the other at
    `offset` in the pass's token axis.

    - `key_valid` [rows, keys]: which key slots hold real tokens (the cached ones, then the new ones);
    - `query_slots` [new]: the key slot of each new token;
    - `cache`: the request's own attention cache (`layers[block].key/.value` [rows, kv_heads, slots, head_dim]), or
      None for a request without one (its keys are its new tokens' only).
    """

    rows: int
    new: int
    offset: int
    key_valid: torch.Tensor
    query_slots: torch.Tensor
    dtype: torch.dtype
    cache: Any | None = None
    _masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict, repr=False)

    @property
    def keys(self) -> int:
        return int(self.key_valid.shape[1])

    def mask(self, window: int | None) -> torch.Tensor | None:
        """The additive causal mask [rows, 1, new, keys] for an attention `window` (None: full causal), built once
        per pass; None when plain causal attention gives the same (every key real, no window cut, and the queries
        either start at slot 0 or are a single token that sees every key)."""
        if window not in self._masks:
            plain = (bool(self.key_valid.all()) and (window is None or self.keys <= window)
                     and (self.new == 1 or int(self.query_slots[0]) == 0))
            self._masks[window] = None if plain else causal_mask(self.key_valid, self.query_slots, window, self.dtype)
        return self._masks[window]

    def tokens(self, packed: torch.Tensor) -> torch.Tensor:
        """This segment's part of a packed [1, heads, tokens, dim] tensor, as [rows, heads, new, dim]."""
        part = packed[0, :, self.offset:self.offset + self.rows * self.new]
        return part.reshape(part.shape[0], self.rows, self.new, part.shape[-1]).transpose(0, 1)


@dataclass
class PassContext:
    """What one pass through a run of blocks gives every block besides hidden states, built by the generic block
    runtime and read by the family module (which decides how its layers consume it).

    A pass packs the new tokens of several requests (sessions' steps, forwards) into one sequence [1, tokens, hidden]
    for the linear layers; attention runs per `segments` entry, over that request's own keys.
    - `positions` [1, tokens]: position id of each packed token (real tokens count up per row; padding gets 1);
    - `segments`: the requests of the pass, in packing order;
    - `windows`: the attention window of each block of the pass (by its number in the model; None: full causal);
    - `cache`: an object with `update(key, value, layer_idx)` that writes each segment's new keys and values into its
      own cache (None when no segment has one);
    - `inputs`: what the family computed once for the pass (`ModelFamily.pass_inputs`: rotary embeddings, ...).
    """

    positions: torch.Tensor
    segments: list[Segment]
    dtype: torch.dtype
    windows: dict[int, int | None] = field(default_factory=dict)
    cache: Any | None = None
    inputs: dict[str, Any] = field(default_factory=dict)


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
    # the prefix of the base model's tensors in a causal-LM checkpoint (e.g. "transformer."); a checkpoint saved from
    # the base model alone lacks it, and weight loading adds it back ("": every checkpoint has the causal LM's names)
    base_model_prefix: str = ""
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")  # the layers a client's LoRA adapts by default (PEFT's)

    def check_config(self, config: Any) -> None:
        """Raise a ConfigError when this family cannot serve `config` exactly (a variant it does not support)."""

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

    def block_tensors(self, config: Any, index: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Block `index`'s tensors as its checkpoint stores them (names after the block's prefix) -> the tensors of
        the block `build_block` makes. A family whose checkpoints keep another layout converts here, taking the
        tensors it replaces out of `tensors` as it goes (the caller holds no other reference to them). Default: as
        stored."""
        return tensors

    def build_shared(self, config: Any) -> nn.Module:
        """A module holding what all blocks of a span share (e.g. rotary frequencies); may be empty."""
        return nn.Module()

    def pass_inputs(self, shared: nn.Module, hidden: torch.Tensor, context: PassContext) -> dict[str, Any]:
        """What every block of this pass needs besides hidden states, computed once (kept in `context.inputs`)."""
        return {}

    def run_block(self, block: nn.Module, index: int, hidden: torch.Tensor, context: PassContext) -> torch.Tensor:
        """Apply block `index` (its number in the whole model) to the packed `hidden` [1, tokens, hidden] of the pass
        described by `context`. The default suits transformers layers that take `past_key_values` and hand extra
        keyword arguments to their attention function (the registered "swarm" attention reads `swarm_pass`)."""
        out = block(hidden, attention_mask=None, past_key_values=context.cache, swarm_pass=context, **context.inputs)
        return out[0] if isinstance(out, tuple) else out

    def attention_implementation(self) -> str | None:
        """The transformers attention implementation this family's blocks run with: "swarm" (per-segment attention
        over each request's own cache, `core/models/attention.py`) for layers that call the `AttentionInterface`."""
        return "swarm"

    def kv_shape(self, config: Any) -> tuple[int, int]:
        """(key/value heads, head size) of one block's attention cache."""
        raise NotImplementedError

    def attention_window(self, config: Any, index: int) -> int | None:
        """Sliding attention window of block `index`, or None for full causal attention."""
        return None

    def build_client_modules(self, config: Any) -> tuple[nn.Module, nn.Module, nn.Module]:
        """(input embeddings, final norm, LM head), uninitialised."""
        raise NotImplementedError

    def build_input_norm(self, config: Any) -> nn.Module:
        """The norm the client applies to the input embeddings (after soft prompts are put in front of them, as
        transformers applies it to `inputs_embeds`), uninitialised; its tensors are under `ClientPrefixes.input_norm`.
        Identity for families without one."""
        return nn.Identity()

    def checkpoint_names(self, config: Any) -> list[str]:
        """Every tensor name a checkpoint of this model has (read off the modules, built on the meta device)."""
        prefixes = self.client_prefixes(config)
        with torch.device("meta"):
            embed, norm, lm_head = self.build_client_modules(config)
            modules = [(prefixes.embed, embed), (prefixes.norm, norm), (prefixes.lm_head, lm_head)]
            if prefixes.input_norm:
                modules.append((prefixes.input_norm, self.build_input_norm(config)))
            modules += [(self.block_prefix(config, i), self.build_block(config, i))
                        for i in range(self.num_blocks(config))]
        return [prefix + name for prefix, module in modules for name in module.state_dict()]
