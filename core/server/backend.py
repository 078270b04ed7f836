"""The blocks a server holds, and the computations on them: forward, backward, and cached inference steps.

`BlockSpan` loads blocks [start, end) of a model from its checkpoint (and nothing else), frozen, in one dtype. Each
computation may run a sub-range of the span. Each pass gives the family one `PassContext` (positions, which keys are
real, the cache, masks built from the family's attention windows); position ids come from the padding mask (the count
of real tokens before each one), as in transformers' `generate`.

Deep prompt tuning: a computation may carry `prompts` [blocks, batch or 1, prompt_length, hidden], one trainable
prompt per block (sent by the client, never kept): before each block, its prompt is added to the hidden states of the
first `prompt_length` positions. `backward` then also returns the gradient w.r.t. the prompts.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ...transport.errors import ConfigError
from ..models import ModelFamily, PassContext
from ..weights import ModelSource, assign_weights, strip_prefix
from .cache import SessionCache

log = logging.getLogger(__name__)


def positions_from_mask(attention_mask: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids of new tokens: real tokens count up from `seen` (per row); padding gets position 1."""
    positions = attention_mask.long().cumsum(-1) - 1
    if seen is not None:
        positions = positions + seen[:, None]
    return positions.masked_fill(attention_mask == 0, 1)


class BlockSpan(torch.nn.Module):
    """Blocks [start, end) of one model, frozen."""

    def __init__(self, family: ModelFamily, config: Any, start: int, end: int, blocks: list[torch.nn.Module],
                 shared: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.family, self.config, self.start, self.end, self.dtype = family, config, start, end, dtype
        self.blocks = torch.nn.ModuleList(blocks)
        self.shared = shared
        self.windows = [family.attention_window(config, i) for i in range(start, end)]
        self.kv_heads, self.head_dim = family.kv_shape(config)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def load(cls, source: ModelSource, start: int, end: int, dtype: torch.dtype) -> BlockSpan:
        config = source.config(dtype)
        family = source.family()
        total = family.num_blocks(config)
        if not 0 <= start < end <= total:
            raise ConfigError(f"blocks {start}:{end} are outside the model's {total} blocks (0:{total})")
        prefixes = [family.block_prefix(config, i) for i in range(start, end)]
        tensors = source.load_tensors(prefixes, dtype=dtype)
        blocks = []
        for i, prefix in zip(range(start, end), prefixes, strict=True):
            with torch.device("meta"):
                block = family.build_block(config, i)
            assign_weights(block, strip_prefix(tensors, prefix), f"block {i}")
            blocks.append(block.to(dtype))
        shared = family.build_shared(config).to(dtype)
        return cls(family, config, start, end, blocks, shared, dtype)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def _range(self, blocks: tuple[int, int] | None) -> range:
        if blocks is None:
            return range(len(self.blocks))
        return range(blocks[0] - self.start, blocks[1] - self.start)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                blocks: tuple[int, int] | None = None, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Run the blocks over whole sequences, no cache (adding `prompts`, one per block, at the prompt positions)."""
        batch, length, _ = hidden.shape
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=hidden.device)
        hidden = hidden.to(self.dtype)
        context = self._context(hidden, positions_from_mask(attention_mask), attention_mask.bool(),
                                torch.arange(length, device=hidden.device), None)
        for n, j in enumerate(self._range(blocks)):
            if prompts is not None:
                hidden = add_prompt(hidden, prompts[n])
            hidden = self.family.run_block(self.blocks[j], self.start + j, hidden, context)
        return hidden

    def _context(self, hidden: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor,
                 query_slots: torch.Tensor, cache: SessionCache | None) -> PassContext:
        windows = {self.start + j: window for j, window in enumerate(self.windows)}
        context = PassContext(positions, key_valid, query_slots, self.dtype, windows, cache)
        context.inputs = self.family.pass_inputs(self.shared, hidden, context)
        return context

    def new_cache(self, batch: int, max_length: int, blocks: tuple[int, int] | None = None) -> SessionCache:
        layers = [self.start + j for j in self._range(blocks)]
        device = next(self.parameters()).device
        return SessionCache(layers, batch, max_length, self.kv_heads, self.head_dim, self.dtype, device)

    @torch.inference_mode()
    def step(self, hidden: torch.Tensor, cache: SessionCache, attention_mask: torch.Tensor | None = None,
             prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Run the cache's blocks over new tokens, appending their keys/values to the cache.

        `prompts` (one per cached block) are added at the first positions: only a step at position 0 may carry them.
        """
        batch, new, _ = hidden.shape
        if attention_mask is None:
            attention_mask = torch.ones(batch, new, dtype=torch.long, device=hidden.device)
        hidden = hidden.to(self.dtype)
        start = cache.length
        cache.valid[:, start:start + new] = attention_mask.bool()
        context = self._context(hidden, positions_from_mask(attention_mask, cache.tokens_seen),
                                cache.valid[:, :start + new], torch.arange(start, start + new, device=hidden.device),
                                cache)
        for n, layer in enumerate(cache.layers):
            if prompts is not None:
                hidden = add_prompt(hidden, prompts[n])
            hidden = self.family.run_block(self.blocks[layer - self.start], layer, hidden, context)
        cache.tokens_seen += attention_mask.long().sum(dim=1)
        cache.advance(new)
        return hidden

    def forward_graph(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      blocks: tuple[int, int] | None = None, prompts: torch.Tensor | None = None) -> Graph:
        """`forward`, recording what `backward` needs (kept between a forward and its backward to skip a recompute)."""
        with torch.enable_grad():
            inputs = hidden.detach().to(self.dtype).requires_grad_(True)
            if prompts is not None:
                prompts = prompts.detach().to(self.dtype).requires_grad_(True)
            out = self.forward(inputs, attention_mask, blocks, prompts)
        return Graph(inputs, prompts, out)

    def backward(self, hidden: torch.Tensor, grad_output: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 blocks: tuple[int, int] | None = None, prompts: torch.Tensor | None = None,
                 graph: Graph | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients of <forward(hidden), grad_output> w.r.t. hidden and `prompts` (weights stay frozen); from the
        recorded `graph` of that forward when there is one, else by running it again."""
        if graph is None:
            graph = self.forward_graph(hidden, attention_mask, blocks, prompts)
        wrt = [graph.inputs] if graph.prompts is None else [graph.inputs, graph.prompts]
        grads = torch.autograd.grad(graph.out, wrt, grad_output.to(graph.out.dtype))
        return grads[0], (grads[1] if graph.prompts is not None else None)


class Graph:
    """A forward pass recorded for autograd: its inputs (and prompts) as leaves, and its output."""

    __slots__ = ("inputs", "prompts", "out")

    def __init__(self, inputs: torch.Tensor, prompts: torch.Tensor | None, out: torch.Tensor):
        self.inputs, self.prompts, self.out = inputs, prompts, out


def add_prompt(hidden: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """`hidden` [batch, length, hidden] with `prompt` [batch or 1, prompt_length, hidden] added at its start."""
    length = prompt.shape[1]
    return torch.cat([hidden[:, :length] + prompt.to(hidden.dtype), hidden[:, length:]], dim=1)
