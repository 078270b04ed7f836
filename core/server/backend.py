"""The blocks a server holds, and the computations on them: forward, backward, and cached inference steps.

`BlockSpan` loads blocks [start, end) of a model from its checkpoint (and nothing else), frozen, in one dtype. Each
computation may run a sub-range of the span. Each pass gives the family one `PassContext` (positions, which keys are
real, the cache, masks built from the family's attention windows); position ids come from the padding mask (the count
of real tokens before each one), as in transformers' `generate`.

Parameter-efficient tasks (core/adapters.py): each request of a pass may run with its own tasks (a named adapter the
server holds, a LoRA the client sends, deep prompts), mixed in one pass. Every linear layer of the blocks has a hook
pair: the layer's own matmul runs once for the whole pass, and each group of tokens that shares tasks gets its tasks'
operators on its tokens only (the pass packs requests of the same tasks next to each other, so a group is one slice).
Deep prompts [blocks, batch or 1, prompt_length, hidden], one trainable prompt per block (sent by the client, never
kept), are added to the hidden states of the first `prompt_length` positions before each block. `backward` also
returns the gradients w.r.t. the prompts and the client's LoRA.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ...quant.weights import quantize_block, quantized_mode
from ...transport.errors import ConfigError
from ...transport.messages import LoraWeights
from ..adapters import (
    DeepPrompts,
    Group,
    LoraPool,
    Task,
    apply_after,
    apply_before,
    block_linears,
    lora_from_stacked,
    model_linears,
)
from ..device import to_device
from ..models import ModelFamily, PassContext
from ..models import attention as _attention  # noqa: F401  (registers the "swarm" attention)
from ..models.base import Segment
from ..weights import ModelSource, assign_weights, take_prefix
from .cache import PassCache, SessionCache

log = logging.getLogger(__name__)


def quantized_block(block: torch.nn.Module, quant: str, dtype: torch.dtype,
                    device: torch.device | str = "cpu") -> torch.nn.Module:
    """`block` (on the CPU, in `dtype`) moved to `device`, its linear layers quantized as `quant` on the way (a bad
    mode or a missing bitsandbytes: ConfigError)."""
    try:
        return quantize_block(block, quant, dtype, device)
    except (ValueError, ImportError) as e:
        raise ConfigError(str(e)) from None


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
        self.quant = quantized_mode(self.blocks)  # weight quantization of the linear layers: none | int8 | nf4
        self.shared = shared
        self.windows = [family.attention_window(config, i) for i in range(start, end)]
        self.kv_heads, self.head_dim = family.kv_shape(config)
        implementation = family.attention_implementation()
        if implementation is not None:  # the blocks read it from their config at each call
            config._attn_implementation = implementation
        self.requires_grad_(False)
        self.eval()
        self._groups: list[Group] = []  # the running pass's task groups (empty: no request of it has tasks)
        self._masks: dict[Any, torch.Tensor] = {}  # what mixing the pass's pooled LoRAs needs, built once a pass
        self._linears = [block_linears(block) for block in blocks]
        self._other_linears: dict[int, dict[str, tuple[int, int]]] = {}
        self._pools: dict[tuple[int, str], LoraPool] = {}  # served LoRAs' weights, per block and layer
        for j, block in enumerate(blocks):
            for name, module in block.named_modules():
                if isinstance(module, torch.nn.Linear):
                    module.register_forward_pre_hook(self._before_hook(start + j, name))
                    module.register_forward_hook(self._after_hook(start + j, name))

    def _before_hook(self, index: int, name: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if not self._groups:
                return None
            x = apply_before(args[0], self._groups, index, name)
            return None if x is args[0] else (x, *args[1:])
        return hook

    def _after_hook(self, index: int, name: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
            if not self._groups:
                return None
            y = apply_after(args[0], out, self._groups, index, name, self._masks)
            return None if y is out else y
        return hook

    def lora_pool(self, index: int, module: str) -> LoraPool:
        """The pool the served LoRAs' weights for layer `module` of block `index` go to."""
        pool = self._pools.get((index, module))
        if pool is None:
            fan_in, fan_out = self.linears(index)[module]
            pool = self._pools[(index, module)] = LoraPool(fan_in, fan_out, self.dtype, self.device)
        return pool

    def linears(self, index: int) -> dict[str, tuple[int, int]]:
        """Block `index`'s linear layers (its number in the model): name -> (in_features, out_features); for a block
        outside the span, read off one built on the meta device (an adapter's file is checked for every block)."""
        if self.start <= index < self.end:
            return self._linears[index - self.start]
        if index not in self._other_linears:
            self._other_linears[index] = model_linears(self.family, self.config, index)
        return self._other_linears[index]

    @classmethod
    def load(cls, source: ModelSource, start: int, end: int, dtype: torch.dtype,
             device: torch.device | str = "cpu", quant: str = "none") -> BlockSpan:
        """Blocks [start, end) of `source` in `dtype` on `device`: read on the CPU one block at a time, each block's
        linear layers quantized as `quant` (none | int8 | nf4: quant/weights.py) on its move to the device, so at
        most one block is ever held in 16/32 bits."""
        device = torch.device(device)
        config = source.config(dtype, device)
        family = source.family()
        total = family.num_blocks(config)
        if not 0 <= start < end <= total:
            raise ConfigError(f"blocks {start}:{end} are outside the model's {total} blocks (0:{total})")
        blocks = []
        for i in range(start, end):  # one block's tensors at a time: read, assigned, moved to the device
            prefix = family.block_prefix(config, i)
            tensors = source.load_tensors([prefix], dtype=dtype)
            with torch.device("meta"):
                block = family.build_block(config, i)
            own = family.block_tensors(config, i, take_prefix(tensors, prefix))  # converted, if the family must
            del tensors
            assign_weights(block, own, f"block {i}")
            del own
            blocks.append(quantized_block(block.to(dtype), quant, dtype, device))
        shared = family.build_shared(config).to(device=device, dtype=dtype)
        return cls(family, config, start, end, blocks, shared, dtype)

    @property
    def device(self) -> torch.device:
        """Where the blocks, their caches and their computations are (inputs are moved here, outputs stay here)."""
        return next(self.parameters()).device

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def _range(self, blocks: tuple[int, int] | None) -> range:
        if blocks is None:
            return range(len(self.blocks))
        return range(blocks[0] - self.start, blocks[1] - self.start)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                blocks: tuple[int, int] | None = None, prompts: torch.Tensor | None = None,
                tasks: tuple[Task, ...] = ()) -> torch.Tensor:
        """Run the blocks over whole sequences, no cache (adding `prompts`, one per block, at the prompt positions;
        with `tasks` on the blocks' layers)."""
        return self.run([Work(hidden, attention_mask, None, prompts, tasks=tasks)], blocks)[0]

    def new_cache(self, batch: int, max_length: int, blocks: tuple[int, int] | None = None) -> SessionCache:
        layers = [self.start + j for j in self._range(blocks)]
        device = self.device
        return SessionCache(layers, batch, max_length, self.kv_heads, self.head_dim, self.dtype, device)

    @torch.inference_mode()
    def step(self, hidden: torch.Tensor, cache: SessionCache, attention_mask: torch.Tensor | None = None,
             prompts: torch.Tensor | None = None, tasks: tuple[Task, ...] = ()) -> torch.Tensor:
        """Run the cache's blocks over new tokens, appending their keys/values to the cache.

        `prompts` (one per cached block) are added at the first positions: only a step at position 0 may carry them.
        """
        return self.run([Work(hidden, attention_mask, cache, prompts, tasks=tasks)], cache.blocks)[0]

    def run(self, works: list[Work], blocks: tuple[int, int] | None = None) -> list[torch.Tensor]:
        """One pass of several requests through blocks [start, end) (default: the whole span): their new tokens are
        packed into one sequence for the linear layers, and each attends over its own keys (its cache's, for a
        session's step, which gets the new keys appended), with its own tasks on the layers. Returns each request's
        output [rows, new, hidden], in the order of `works`."""
        indices = list(self._range(blocks))
        first = self.start + indices[0]
        works = [work.to(self.device) for work in works]
        order = sorted(range(len(works)), key=lambda i: tuple(id(t) for t in works[i].tasks))  # same tasks: adjacent
        packed = [works[i] for i in order]
        hidden, segments = self._pack(packed)
        caches = [(w.cache, s) for w, s in zip(packed, segments, strict=True) if w.cache is not None]
        windows = {self.start + j: self.windows[j] for j in indices}
        context = PassContext(torch.cat([_positions(w) for w in packed], dim=1), segments, self.dtype, windows,
                              PassCache(caches) if caches else None)
        context.inputs = self.family.pass_inputs(self.shared, hidden, context)
        self._groups = _groups(packed, segments, first)
        self._masks = {}
        try:
            for j in indices:
                if self._groups:  # deep prompts, before the block
                    hidden = apply_before(hidden, self._groups, self.start + j, "")
                hidden = self.family.run_block(self.blocks[j], self.start + j, hidden, context)
        finally:
            self._groups = []
        for cache, segment in caches:
            cache.tokens_seen += cache.valid[:, cache.length:cache.length + segment.new].sum(dim=1)
            cache.advance(segment.new)
        outs: list[torch.Tensor] = [hidden] * len(works)
        for i, s in zip(order, segments, strict=True):
            outs[i] = hidden[0, s.offset:s.offset + s.rows * s.new].view(s.rows, s.new, -1)
        return outs

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
                      blocks: tuple[int, int] | None = None, prompts: torch.Tensor | None = None,
                      tasks: tuple[Task, ...] = (), lora: LoraWeights | None = None) -> Graph:
        """`forward`, recording what `backward` needs (kept between a forward and its backward to skip a recompute).
        The client's `lora` (for these blocks) is a leaf too: `backward` gives its gradients."""
        first = self.start if blocks is None else blocks[0]
        device = self.device
        with torch.enable_grad():
            inputs = hidden.detach().to(device, self.dtype).requires_grad_(True)
            if prompts is not None:
                prompts = prompts.detach().to(device, self.dtype).requires_grad_(True)
            leaves: dict[str, torch.Tensor] = {}
            if lora is not None:
                leaves = {name: t.detach().to(device, self.dtype).requires_grad_(True)
                          for name, t in lora.tensors().items()}
                own = lora_from_stacked(first, lora.scaling, {m: leaves[f"lora_a.{m}"] for m in lora.a},
                                        {m: leaves[f"lora_b.{m}"] for m in lora.b})
                tasks = (*tasks, own)
            out = self.forward(inputs, attention_mask, blocks, prompts, tasks)
        return Graph(inputs, prompts, out, leaves)

    def backward(self, hidden: torch.Tensor, grad_output: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 blocks: tuple[int, int] | None = None, prompts: torch.Tensor | None = None,
                 graph: Graph | None = None, tasks: tuple[Task, ...] = (), lora: LoraWeights | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """Gradients of <forward(hidden), grad_output> w.r.t. hidden, `prompts` and the client's `lora` ("lora_a.M"
        -> gradient; weights stay frozen); from the recorded `graph` of that forward when there is one, else by
        running it again."""
        if graph is None:
            graph = self.forward_graph(hidden, attention_mask, blocks, prompts, tasks, lora)
        names = list(graph.lora)
        wrt = [graph.inputs, *([] if graph.prompts is None else [graph.prompts]), *graph.lora.values()]
        grads = list(torch.autograd.grad(graph.out, wrt, grad_output.to(graph.out.device, graph.out.dtype),
                                         allow_unused=True))
        grad_input = grads.pop(0)
        grad_prompts = grads.pop(0) if graph.prompts is not None else None
        grad_lora = {n: (g if g is not None else torch.zeros_like(graph.lora[n])) for n, g in zip(names, grads,
                                                                                                 strict=True)}
        return grad_input, grad_prompts, grad_lora


class Work:
    """One request's part of a pass: new tokens [rows, new, hidden], their padding mask [rows, new] (1: real),
    the session's cache (None: no cache), deep prompts [blocks of the pass, rows or 1, prompt_length, hidden]
    whose columns start at `column` of the request (a long step runs in several passes, `column` tokens in), and the
    parameter-efficient tasks it runs with (a named adapter, the client's LoRA)."""

    __slots__ = ("hidden", "mask", "cache", "prompts", "column", "tasks")

    def __init__(self, hidden: torch.Tensor, mask: torch.Tensor | None = None, cache: SessionCache | None = None,
                 prompts: torch.Tensor | None = None, column: int = 0, tasks: tuple[Task, ...] = ()):
        rows, new = hidden.shape[:2]
        self.hidden, self.cache, self.prompts, self.column, self.tasks = hidden, cache, prompts, column, tasks
        self.mask = torch.ones(rows, new, dtype=torch.long, device=hidden.device) if mask is None else mask

    def to(self, device: torch.device) -> Work:
        """This work with its tensors on `device` (itself when they are there already)."""
        if self.hidden.device == device and self.mask.device == device:
            return self
        return Work(to_device(self.hidden, device), to_device(self.mask, device), self.cache,
                    to_device(self.prompts, device), self.column, self.tasks)


def _positions(work: Work) -> torch.Tensor:
    seen = None if work.cache is None else work.cache.tokens_seen
    return positions_from_mask(work.mask, seen).reshape(1, -1)


def _groups(works: list[Work], segments: list[Segment], first: int) -> list[Group]:
    """The pass's task groups: runs of packed requests that share the same tasks, as token ranges (a request with
    deep prompts is a group of its own: its prompts are its own task)."""
    groups: list[Group] = []
    for work, segment in zip(works, segments, strict=True):
        tasks = work.tasks
        if work.prompts is not None:
            tasks = (*tasks, DeepPrompts(work.prompts, first, segment.rows, segment.new, work.column))
        if not tasks:
            continue
        a, b = segment.offset, segment.offset + segment.rows * segment.new
        if groups and work.prompts is None and groups[-1][1] == a and groups[-1][2] == tasks:
            groups[-1] = (groups[-1][0], b, tasks)
        else:
            groups.append((a, b, tasks))
    return groups


class Graph:
    """A forward pass recorded for autograd: its inputs (and prompts, and the client's LoRA) as leaves, and its
    output."""

    __slots__ = ("inputs", "prompts", "out", "lora")

    def __init__(self, inputs: torch.Tensor, prompts: torch.Tensor | None, out: torch.Tensor,
                 lora: dict[str, torch.Tensor] | None = None):
        self.inputs, self.prompts, self.out, self.lora = inputs, prompts, out, lora or {}
