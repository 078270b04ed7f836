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
from ..models import attention as _attention  # noqa: F401  (registers the "swarm" attention)
from ..models.base import Segment
from ..weights import ModelSource, assign_weights, strip_prefix
from .cache import PassCache, SessionCache

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
        implementation = family.attention_implementation()
        if implementation is not None:  # the blocks read it from their config at each call
            config._attn_implementation = implementation
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
        return self.run([Work(hidden, attention_mask, None, prompts)], blocks)[0]

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
        return self.run([Work(hidden, attention_mask, cache, prompts)], cache.blocks)[0]

    def run(self, works: list[Work], blocks: tuple[int, int] | None = None) -> list[torch.Tensor]:
        """One pass of several requests through blocks [start, end) (default: the whole span): their new tokens are
        packed into one sequence for the linear layers, and each attends over its own keys (its cache's, for a
        session's step, which gets the new keys appended). Returns each request's output [rows, new, hidden]."""
        hidden, segments = self._pack(works)
        caches = [(w.cache, s) for w, s in zip(works, segments, strict=True) if w.cache is not None]
        indices = list(self._range(blocks))
        windows = {self.start + j: self.windows[j] for j in indices}
        context = PassContext(torch.cat([_positions(w) for w in works], dim=1), segments, self.dtype, windows,
                              PassCache(caches) if caches else None)
        context.inputs = self.family.pass_inputs(self.shared, hidden, context)
        for n, j in enumerate(indices):
            hidden = _add_prompts(hidden, works, segments, n)
            hidden = self.family.run_block(self.blocks[j], self.start + j, hidden, context)
        for cache, segment in caches:
            cache.tokens_seen += cache.valid[:, cache.length:cache.length + segment.new].sum(dim=1)
            cache.advance(segment.new)
        return [hidden[0, s.offset:s.offset + s.rows * s.new].view(s.rows, s.new, -1) for s in segments]

    def _pack(self, works: list[Work]) -> tuple[torch.Tensor, list[Segment]]:
        """The works' tokens as one sequence [1, tokens, hidden], and where each one's are."""
        parts, segments, offset = [], [], 0
        for work in works:
            rows, new, size = work.hidden.shape
            mask = work.mask
            if work.cache is None:
                valid, slots = mask.bool(), torch.arange(new, device=mask.device)
            else:
                start = work.cache.length
                work.cache.valid[:, start:start + new] = mask.bool()
                valid, slots = work.cache.valid[:, :start + new], torch.arange(start, start + new, device=mask.device)
            segments.append(Segment(rows, new, offset, valid, slots, self.dtype, work.cache))
            parts.append(work.hidden.to(self.dtype).reshape(1, rows * new, size))
            offset += rows * new
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), segments

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


class Work:
    """One request's part of a pass: new tokens [rows, new, hidden], their padding mask [rows, new] (1: real),
    the session's cache (None: no cache) and deep prompts [blocks of the pass, rows or 1, prompt_length, hidden]
    whose columns start at `column` of the request (a long step runs in several passes, `column` tokens in)."""

    __slots__ = ("hidden", "mask", "cache", "prompts", "column")

    def __init__(self, hidden: torch.Tensor, mask: torch.Tensor | None = None, cache: SessionCache | None = None,
                 prompts: torch.Tensor | None = None, column: int = 0):
        rows, new = hidden.shape[:2]
        self.hidden, self.cache, self.prompts, self.column = hidden, cache, prompts, column
        self.mask = torch.ones(rows, new, dtype=torch.long, device=hidden.device) if mask is None else mask


def _positions(work: Work) -> torch.Tensor:
    seen = None if work.cache is None else work.cache.tokens_seen
    return positions_from_mask(work.mask, seen).reshape(1, -1)


def _add_prompts(hidden: torch.Tensor, works: list[Work], segments: list[Segment], n: int) -> torch.Tensor:
    """`hidden` with each work's prompt for the pass's block `n` added at its prompt positions (out of place, so
    autograd sees it)."""
    for work, segment in zip(works, segments, strict=True):
        if work.prompts is None or work.column >= work.prompts.shape[2]:
            continue
        prompt = work.prompts[n][:, work.column:work.column + segment.new]  # [rows or 1, columns, hidden]
        rows = hidden[0, segment.offset:segment.offset + segment.rows * segment.new].view(segment.rows, segment.new, -1)
        added = torch.cat([rows[:, :prompt.shape[1]] + prompt.to(hidden.dtype), rows[:, prompt.shape[1]:]], dim=1)
        hidden = torch.cat([hidden[:, :segment.offset], added.reshape(1, -1, hidden.shape[-1]),
                            hidden[:, segment.offset + segment.rows * segment.new:]], dim=1)
    return hidden


class Graph:
    """A forward pass recorded for autograd: its inputs (and prompts) as leaves, and its output."""

    __slots__ = ("inputs", "prompts", "out")

    def __init__(self, inputs: torch.Tensor, prompts: torch.Tensor | None, out: torch.Tensor):
        self.inputs, self.prompts, self.out = inputs, prompts, out
