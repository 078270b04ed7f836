"""Parameter-efficient tasks on frozen blocks: LoRA, (IA)^3 and deep prompts behind one small interface (PetS).

PetS's idea: a task fine-tuned from a shared model is the model's own (shared) operators plus a small task operator
beside some of them. Here a task operator (`TaskOp`) sits on one linear layer of a block, or on the block's input:
- `before(x)` changes what goes in: (IA)^3 on a feed-forward layer scales the layer's input, a deep prompt adds itself
  to the prompt positions of the block's input;
- `after(x, y)` changes what comes out, given what went in: LoRA adds `(x A^T) B^T * scaling`, (IA)^3 on any other
  layer scales the output.
The shared operator (the frozen layer) runs ONCE for a whole pass of many requests; each request's task operators run
on its own tokens only (`apply_before`/`apply_after` over the pass's groups), so requests of different tasks, and of
none, share one pass. A `Task` is one task's operators over a run of blocks: `task.op(block, module)` (module "" is
the block's input). BitFit-style bias offsets would be one more TaskOp (after: y + b), diff pruning another
(after: y + x D^T), and one more Task class reading their format.

On disk, tasks are PEFT adapters (`adapter_config.json` + `adapter_model.safetensors`). `read_peft` reads one for
blocks [start, end) of a model (only those blocks' tensors) and checks it against the blocks (PEFT type, options,
target modules, shapes, values) with one clear error. `lora_from_stacked` builds the LoRA a client sends along with
its requests (the client trains it; see core/client/lora.py), and `peft_lora_files` writes one in PEFT's format.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..transport.errors import ConfigError
from .models import ModelFamily

log = logging.getLogger(__name__)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT saves a model's tensors under this prefix
SUPPORTED_TYPES = ("LORA", "IA3")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,99}")  # an adapter's name: a hub id or a directory's name
MAX_CONFIG_BYTES = 1 << 20


class TaskOp:
    """One task's operator on one linear layer (or on a block's input). Both methods see one request group's tokens
    [1, tokens, features] and return new tensors (never change their arguments)."""

    nbytes = 0

    def to(self, device: torch.device) -> None:
        """Move its own tensors to `device` (a pooled LoRA's live in its pool, on the pool's device)."""
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor) and value.device != device:
                setattr(self, name, value.to(device))

    def before(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def after(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y

    def after_(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """`after`, written into `y` (no autograd)."""
        y.copy_(self.after(x, y))

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.changes_input = cls.before is not TaskOp.before  # whether it has a `before`, an `after`
        cls.changes_output = cls.after is not TaskOp.after

    changes_input = False
    changes_output = False


class LoraPool:
    """The A rows and B columns of every served LoRA of one linear layer of one block, in one pair of tensors (as
    S-LoRA keeps adapters in one memory pool): a LoRA of rank r owns r rows of `a` [rows, in] and of `bt` [rows, out]
    (B transposed). A pass that mixes several pooled LoRAs on a layer runs them as two matmuls over the rows they span
    (`lora_stacked`) instead of two per LoRA. The pool grows by exactly what a LoRA needs (its memory is the LoRAs'
    own bytes), freed rows are zeroed and reused first, and a free tail is given back."""

    def __init__(self, fan_in: int, fan_out: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.a = torch.zeros(0, fan_in, dtype=dtype, device=device)
        self.bt = torch.zeros(0, fan_out, dtype=dtype, device=device)
        self.holes: list[tuple[int, int]] = []  # (start, rows) of freed rows, zeroed
        self._lock = threading.Lock()

    @property
    def rows(self) -> int:
        return int(self.a.shape[0])

    def put(self, a: torch.Tensor, b: torch.Tensor) -> int:
        """Store A [r, in] and B [out, r]; returns the first of the r rows they got."""
        rank = a.shape[0]
        with self._lock:
            hole = next((h for h in self.holes if h[1] >= rank), None)
            if hole is not None:
                self.holes.remove(hole)
                if hole[1] > rank:
                    self.holes.append((hole[0] + rank, hole[1] - rank))
                start = hole[0]
            else:  # grow by exactly r rows (the old tensors stay valid for a pass that holds them)
                start = self.rows
                grow = {"dtype": self.a.dtype, "device": self.a.device}
                self.a = torch.cat([self.a, torch.zeros(rank, self.a.shape[1], **grow)])
                self.bt = torch.cat([self.bt, torch.zeros(rank, self.bt.shape[1], **grow)])
            self.a[start:start + rank] = a.to(self.a.dtype)
            self.bt[start:start + rank] = b.T.to(self.bt.dtype)
            return start

    def free(self, start: int, rank: int) -> None:
        with self._lock:
            self.a[start:start + rank] = 0
            self.bt[start:start + rank] = 0
            holes = sorted([*self.holes, (start, rank)])
            merged: list[tuple[int, int]] = []
            for h in holes:
                if merged and merged[-1][0] + merged[-1][1] == h[0]:
                    merged[-1] = (merged[-1][0], merged[-1][1] + h[1])
                else:
                    merged.append(h)
            if merged and merged[-1][0] + merged[-1][1] == self.rows:  # a free tail: give it back
                tail = merged.pop()
                self.a, self.bt = self.a[:tail[0]].clone(), self.bt[:tail[0]].clone()
            self.holes = merged


class LoraOp(TaskOp):
    """LoRA: y + (x A^T) B^T * scaling, with A [r, in] and B [out, r] (kept in a `LoraPool` when one is given)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scaling: float, pool: LoraPool | None = None):
        self.scaling, self.rank, self.pool = float(scaling), int(a.shape[0]), pool
        self.nbytes = a.nbytes + b.nbytes
        if pool is None:
            self._a, self._b = a, b
        else:
            self.start = pool.put(a, b)

    @property
    def a(self) -> torch.Tensor:
        return self._a if self.pool is None else self.pool.a[self.start:self.start + self.rank]

    @property
    def b(self) -> torch.Tensor:
        return self._b if self.pool is None else self.pool.bt[self.start:self.start + self.rank].T

    def release(self) -> None:
        """Give its rows back to the pool (it must not be used after)."""
        if self.pool is not None:
            self.pool.free(self.start, self.rank)
            self.pool = None
            self._a = self._b = torch.zeros(0)

    def after(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + ((x.to(self.a.dtype) @ self.a.T) * self.scaling) @ self.b.T

    def after_(self, x: torch.Tensor, y: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).to(self.a.dtype)
        y.view(-1, y.shape[-1]).addmm_((rows @ self.a.T).mul_(self.scaling), self.b.T)


class IA3Op(TaskOp):
    """(IA)^3: the layer's output scaled by a learned vector, or (for a feed-forward layer) its input."""

    def __init__(self, scale: torch.Tensor, feedforward: bool):
        self.scale, self.feedforward = scale.flatten(), feedforward
        self.nbytes = scale.nbytes

    def before(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale if self.feedforward else x

    def after(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y if self.feedforward else y * self.scale

    def after_(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if not self.feedforward:
            y.mul_(self.scale)


class PromptOp(TaskOp):
    """A deep prompt: `prompt` [rows or 1, columns, hidden] added to the first positions of each of `rows` sequences
    of `new` tokens (packed one row after the other)."""

    def __init__(self, prompt: torch.Tensor, rows: int, new: int):
        self.prompt, self.rows, self.new = prompt, rows, new
        self.nbytes = prompt.nbytes

    def before(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(self.rows, self.new, x.shape[-1])
        width = self.prompt.shape[1]
        added = torch.cat([rows[:, :width] + self.prompt.to(x.dtype), rows[:, width:]], dim=1)
        return added.reshape(x.shape)


class Task:
    """One parameter-efficient task over some blocks: its operators by (block number, module name)."""

    kind = ""

    def __init__(self, name: str, ops: dict[tuple[int, str], TaskOp]):
        self.name, self.ops = name, ops
        self.nbytes = sum(op.nbytes for op in ops.values())
        self.modules = {module for _, module in ops}

    def to(self, device: torch.device) -> Task:
        """This task with its operators' tensors on `device` (where the blocks it runs on are)."""
        for op in self.ops.values():
            op.to(device)
        return self

    def op(self, block: int, module: str) -> TaskOp | None:
        return self.ops.get((block, module))

    def release(self) -> None:
        """Free what it keeps in shared pools (a dropped adapter)."""
        for op in self.ops.values():
            if isinstance(op, LoraOp):
                op.release()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self.ops)} ops, {self.nbytes} bytes)"


class Lora(Task):
    kind = "lora"


class IA3(Task):
    kind = "ia3"


class DeepPrompts(Task):
    """Deep prompts a request carries: [blocks of the pass, rows or 1, prompt_length, hidden] from block `first`,
    for a request of `rows` sequences of `new` tokens starting `column` tokens in (a long step runs in chunks)."""

    kind = "prompts"

    def __init__(self, prompts: torch.Tensor, first: int, rows: int, new: int, column: int = 0):
        ops: dict[tuple[int, str], TaskOp] = {}
        if column < prompts.shape[2]:
            for n in range(prompts.shape[0]):
                ops[(first + n, "")] = PromptOp(prompts[n][:, column:column + new], rows, new)
        super().__init__("prompts", ops)


def lora_from_stacked(first: int, scaling: float, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                      name: str = "request") -> Lora:
    """A LoRA from per-module stacks: a[module] [blocks, r, in], b[module] [blocks, out, r], from block `first`
    (the form a client sends its LoRA in; slicing keeps autograd's view of the stacks)."""
    ops: dict[tuple[int, str], TaskOp] = {}
    for module, stack in a.items():
        for n in range(stack.shape[0]):
            ops[(first + n, module)] = LoraOp(stack[n], b[module][n], scaling)
    return Lora(name, ops)


# --- running a pass's tasks --------------------------------------------------------------------------------------

Group = tuple[int, int, tuple[Task, ...]]  # packed tokens [start, end) of a pass, and the tasks they run with


def apply_before(x: torch.Tensor, groups: list[Group], block: int, module: str) -> torch.Tensor:
    """`x` [1, tokens, features] with each group's `before` operators applied to its tokens."""
    return _apply(x, groups, block, module, lambda op, part, _: op.before(part), "changes_input", False)


def apply_after(x: torch.Tensor, y: torch.Tensor, groups: list[Group], block: int, module: str,
                masks: dict[Any, torch.Tensor] | None = None) -> torch.Tensor:
    """`y` (the shared operator's output for `x`, which nothing else holds) with each group's `after` operators
    applied to its tokens (in place when autograd is off: `y` is returned, changed). `masks` keeps what
    `lora_stacked` builds for the pass (its layers mostly share one)."""
    if (not torch.is_grad_enabled() or torch.is_inference_mode_enabled()) and y.is_contiguous():
        pooled: list[tuple[int, int, LoraOp]] = []  # groups whose only operator here is a pooled LoRA
        for a, b, tasks in groups:
            ops = [op for op in (task.ops.get((block, module)) for task in tasks) if op is not None
                   and op.changes_output]
            if len(ops) == 1 and isinstance(ops[0], LoraOp) and ops[0].pool is not None:
                pooled.append((a, b, ops[0]))
                continue
            for op in ops:  # in order: operators of several tasks on one layer compose
                op.after_(x[:, a:b], y[:, a:b])
        if len(pooled) == 1:
            a, b, op = pooled[0]
            op.after_(x[:, a:b], y[:, a:b])
        elif pooled:
            lora_stacked(x, y, pooled, masks)
        return y
    return _apply(y, groups, block, module, lambda op, part, a_b: op.after(x[:, a_b[0]:a_b[1]], part),
                  "changes_output", True)


def lora_stacked(x: torch.Tensor, y: torch.Tensor, groups: list[tuple[int, int, LoraOp]],
                 masks: dict[Any, torch.Tensor] | None = None) -> None:
    """y[:, a:b] += LoRA_g(x[:, a:b]) for every group g, all LoRAs in one pool: two matmuls over the pool rows the
    groups use (a mask keeps each token to its own LoRA's rows, scaled), instead of two per group (the pure-torch
    analogue of Punica's and vLLM's batched LoRA kernels). Falls back to one LoRA at a time when the rows in between
    would cost more than the saved calls."""
    pool = groups[0][2].pool
    lo = min(op.start for _, _, op in groups)
    hi = max(op.start + op.rank for _, _, op in groups)
    first, last = min(a for a, _, _ in groups), max(b for _, b, _ in groups)
    used = sum(op.rank for _, _, op in groups)
    if any(op.pool is not pool for _, _, op in groups) or (hi - lo) > 4 * used + 16:
        for a, b, op in groups:
            op.after_(x[:, a:b], y[:, a:b])
        return
    weights_a, weights_bt = pool.a, pool.bt  # one snapshot: a pool may grow meanwhile (on the loading thread)
    key = (weights_a.dtype, last - first, hi - lo, *((a - first, b - first, op.start - lo, op.rank, op.scaling)
                                                      for a, b, op in groups))
    mask = None if masks is None else masks.get(key)
    if mask is None:
        mask = torch.zeros(last - first, hi - lo, dtype=weights_a.dtype, device=weights_a.device)
        for a, b, op in groups:
            mask[a - first:b - first, op.start - lo:op.start + op.rank - lo] = op.scaling
        if masks is not None:
            masks[key] = mask
    rows = x[0, first:last].to(weights_a.dtype)
    y[0, first:last].addmm_((rows @ weights_a[lo:hi].T).mul_(mask), weights_bt[lo:hi])


def _apply(t: torch.Tensor, groups: list[Group], block: int, module: str,
           run: Callable[[TaskOp, torch.Tensor, tuple[int, int]], torch.Tensor], needs: str, owned: bool
           ) -> torch.Tensor:
    pieces: list[tuple[int, int, torch.Tensor]] = []
    for a, b, tasks in groups:
        part = None
        for task in tasks:
            op = task.op(block, module)
            if op is None or not getattr(op, needs):
                continue
            part = run(op, t[:, a:b] if part is None else part, (a, b))
        if part is not None:
            pieces.append((a, b, part))
    if not pieces:
        return t
    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():  # no autograd: write the parts in place
        out = t if owned and t.is_contiguous() else t.clone()
        for a, b, part in pieces:
            out[:, a:b] = part
        return out
    parts, at = [], 0  # out of place, for autograd
    for a, b, part in pieces:
        parts += [t[:, at:a], part]
        at = b
    parts.append(t[:, at:])
    return torch.cat([p for p in parts if p.shape[1]], dim=1)


# --- PEFT adapters on disk -----------------------------------------------------------------------------------------


def adapter_name(name_or_path: str) -> str:
    """The name an adapter is announced and chosen by: a local directory's name, or the hub id as given."""
    path = Path(name_or_path).expanduser()
    name = path.name if path.is_dir() else name_or_path
    if not NAME.fullmatch(name):
        raise ConfigError(f"adapter name {name[:120]!r} must be 1 to 100 characters from letters, digits, '.', '_', "
                          "'-' and '/', starting with a letter or digit")
    return name


def adapter_files(name_or_path: str) -> tuple[Path, Path]:
    """(adapter_config.json, adapter_model.safetensors) of a local adapter directory or a hub adapter id."""
    from .weights import ModelSource

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        config, weights = path / PEFT_CONFIG, path / PEFT_WEIGHTS
        if not config.is_file():
            raise ConfigError(f"{path} is not a PEFT adapter: it has no {PEFT_CONFIG}")
        if not weights.is_file():
            pickled = " (it has adapter_model.bin, a pickle file swarm does not read: save the adapter with " \
                      "safe_serialization=True)" if (path / "adapter_model.bin").is_file() else ""
            raise ConfigError(f"{path} has no {PEFT_WEIGHTS}{pickled}")
        return config, weights
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        raise ConfigError(f"adapter {name_or_path!r} is not a directory with a PEFT adapter in it")
    try:
        source = ModelSource(name_or_path)
        config_path = source.file(PEFT_CONFIG)
        weights_path = source.file(PEFT_WEIGHTS, required=False)
    except ConfigError as e:
        raise ConfigError(f"adapter {name_or_path!r}: {str(e).replace('model ', 'repository ', 1)}") from None
    if weights_path is None:
        raise ConfigError(f"adapter {name_or_path!r} has no {PEFT_WEIGHTS} on the hub (swarm reads no pickle "
                          "files such as adapter_model.bin)")
    return config_path, weights_path


def read_peft_config(path: Path, what: str = "a JSON object") -> dict[str, Any]:
    """A JSON object from `path` (a config of at most MAX_CONFIG_BYTES); a ConfigError says what is wrong."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    except RecursionError:  # json's decoder recurses once per nested array or object
        raise ConfigError(f"cannot read {path}: its JSON is nested too deeply") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not {what}")
    return config


def block_linears(block: nn.Module) -> dict[str, tuple[int, int]]:
    """The linear layers of a block: name -> (in_features, out_features)."""
    return {name: (m.in_features, m.out_features) for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def model_linears(family: ModelFamily, config: Any, index: int) -> dict[str, tuple[int, int]]:
    """`block_linears` of block `index` of a model, read off a block built on the meta device."""
    with torch.device("meta"):
        return block_linears(family.build_block(config, index))


_SUFFIXES = {"lora_A.weight": "A", "lora_B.weight": "B", "ia3_l": "l"}


def check_peft(name_or_path: str, layers: Iterable[str] = ()) -> tuple[str, dict[str, Any], Path]:
    """(name, adapter_config.json, weights file) of a PEFT adapter whose type and options swarm supports; what the
    files hold is checked by `read_peft`. Cheap: a server checks its adapters this way before loading its blocks.
    `layers` (a block's linear layers, when known) are named in the error for an adapter that targets others."""
    name = adapter_name(name_or_path)
    config_path, weights_path = adapter_files(name_or_path)
    peft = read_peft_config(config_path)
    kind = str(peft.get("peft_type", "")).upper()
    where = f"adapter {name}"
    if kind not in SUPPORTED_TYPES:
        raise ConfigError(f"{where} is a {peft.get('peft_type')!r} adapter; swarm serves "
                          f"{' and '.join(SUPPORTED_TYPES)} adapters (and deep prompts, trained with `swarm tune "
                          "--mode deep_ptune`)")
    _check_options(peft, kind, where)
    _check_types(peft, where)
    _check_parameters(peft, where, layers)
    return name, peft, weights_path


def _check_types(peft: dict[str, Any], where: str) -> None:
    """The config's module lists and patterns have the types PEFT writes, and its regular expressions compile (a
    junk config is one ConfigError, not a TypeError or re.error when the tensors are matched against it)."""
    def refuse(option: str, expected: str) -> None:
        raise ConfigError(f"{where}: {PEFT_CONFIG} field {option} must be {expected}, got {peft.get(option)!r:.80}")

    def regex(option: str, pattern: str) -> None:
        try:
            re.compile(pattern if option.endswith("_modules") else rf"(.*\.)?({pattern})$")  # as _pattern uses it
        except (re.error, RecursionError, OverflowError) as e:
            raise ConfigError(f"{where}: {PEFT_CONFIG} field {option} holds {pattern[:80]!r}, which is not a "
                              f"regular expression ({e})") from None

    for option in ("target_modules", "exclude_modules", "feedforward_modules", "modules_to_save"):
        value = peft.get(option)
        if value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            continue
        if not isinstance(value, str) or option == "modules_to_save":
            refuse(option, "a list of module names" + ("" if option == "modules_to_save" else " or a pattern"))
        regex(option, value)
    for option in ("rank_pattern", "alpha_pattern"):
        value = peft.get(option)
        if value is None:
            continue
        if not isinstance(value, dict):
            refuse(option, "a map of patterns to numbers")
        for pattern in value:
            regex(option, str(pattern))
    layers = peft.get("layers_to_transform")
    if not (layers is None or isinstance(layers, int) or (isinstance(layers, list)
                                                          and all(isinstance(v, int) for v in layers))):
        refuse("layers_to_transform", "a block index or a list of them")


def read_peft(name_or_path: str, family: ModelFamily, config: Any, start: int, end: int,
              linears: Callable[[int], dict[str, tuple[int, int]]], dtype: torch.dtype,
              max_bytes: int | None = None, pools: Callable[[int, str], LoraPool] | None = None) -> Task:
    """The PEFT adapter `name_or_path` (a local directory or a hub id) for blocks [start, end) of a model, checked
    against the model: a ConfigError says what is wrong (unsupported type or option, a target that is not a block's
    linear layer, a missing tensor, a shape the model does not have, values that are not finite). Only the tensors
    of these blocks are read. `linears(i)` gives block i's linear layers (`block_linears`); `pools(i, module)`, the
    pool a LoRA's weights for that layer go to (a server's), when given."""
    name, peft, weights_path = check_peft(name_or_path, linears(start))
    kind = str(peft.get("peft_type", "")).upper()
    base = peft.get("base_model_name_or_path") or "an unnamed base model"
    where = f"adapter {name}"
    total = family.num_blocks(config)
    prefixes = {PEFT_PREFIX + family.block_prefix(config, i): i for i in range(total)}
    try:
        return _read_peft(name, peft, kind, base, where, prefixes, weights_path, family, config, start, end,
                          linears, dtype, max_bytes, pools)
    except SafetensorError as e:  # a truncated or junk weights file
        raise ConfigError(f"{where}: {weights_path.name} is not a readable safetensors file ({e})") from None


def _read_peft(name: str, peft: dict[str, Any], kind: str, base: str, where: str, prefixes: dict[str, int],
               weights_path: Path, family: ModelFamily, config: Any, start: int, end: int,
               linears: Callable[[int], dict[str, tuple[int, int]]], dtype: torch.dtype, max_bytes: int | None,
               pools: Callable[[int, str], LoraPool] | None) -> Task:
    total = family.num_blocks(config)
    with safe_open(str(weights_path), framework="pt") as f:
        keys = list(f.keys())
        found: dict[tuple[int, str], dict[str, str]] = {}  # (block, module) -> {"A"|"B"|"l": key}
        saved_whole = tuple(f"{PEFT_PREFIX}{m}." for m in peft.get("modules_to_save") or [] if isinstance(m, str))
        for key in keys:
            if key.startswith(saved_whole) and not any(key.startswith(p) for p in prefixes):
                continue  # a module trained whole outside the blocks (a classifier's head): the client's
            block, rest = _split_key(key, prefixes, where, base, total)
            module, part = _module_part(rest, key, where)
            modules = linears(block)
            if module not in modules:
                raise ConfigError(f"{where} targets {module!r} (tensor {key}), which is not a linear layer of block "
                                  f"{block}; swarm applies adapters to the blocks' linear layers: "
                                  f"{', '.join(sorted(modules))}")
            if (part == "l") != (kind == "IA3"):
                raise ConfigError(f"{where}: tensor {key} does not belong in a {kind} adapter")
            found.setdefault((block, module), {})[part] = key
        _check_targets(peft, kind, found, linears, total, where,
                       lambda block, module: family.block_prefix(config, block) + module)
        ops: dict[tuple[int, str], TaskOp] = {}
        try:
            _read_ops(f, peft, kind, found, ops, start, end, linears, family, config, where, base, dtype, max_bytes,
                      pools)
        except BaseException:
            Task(name, ops).release()  # what went into shared pools already
            raise
    cls = Lora if kind == "LORA" else IA3
    task = cls(name, ops)
    if not ops:
        log.warning("%s changes none of blocks %d:%d", where, start, end)
    return task


def _read_ops(f: Any, peft: dict[str, Any], kind: str, found: dict[tuple[int, str], dict[str, str]],
              ops: dict[tuple[int, str], TaskOp], start: int, end: int,
              linears: Callable[[int], dict[str, tuple[int, int]]], family: ModelFamily, config: Any, where: str,
              base: str, dtype: torch.dtype, max_bytes: int | None,
              pools: Callable[[int, str], LoraPool] | None) -> None:
    nbytes = 0
    for (block, module), parts in sorted(found.items()):
        if not start <= block < end:
            continue
        fan_in, fan_out = linears(block)[module]
        tensors = {p: f.get_tensor(k) for p, k in parts.items()}
        for p, t in tensors.items():
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise ConfigError(f"{where}: tensor {parts[p]} has values that are not finite floats")
        if kind == "LORA":
            op = _lora_op(peft, tensors, parts, block, module, fan_in, fan_out, family, config, where, base,
                          dtype, None if pools is None else pools(block, module))
        else:
            op = _ia3_op(peft, tensors["l"], parts["l"], module, fan_in, fan_out, where, base, dtype,
                         family.block_prefix(config, block) + module)
        ops[(block, module)] = op
        nbytes += op.nbytes
        if max_bytes is not None and nbytes > max_bytes:
            raise ConfigError(f"{where} takes more than the {max_bytes} bytes an adapter may take on this server")


def _check_options(peft: dict[str, Any], kind: str, where: str) -> None:
    def refuse(option: str) -> None:
        raise ConfigError(f"{where} uses {option}, which swarm does not support (it serves plain LoRA of any rank "
                          "and alpha, rsLoRA, rank/alpha patterns, and (IA)^3)")

    if peft.get("fan_in_fan_out"):
        refuse("fan_in_fan_out")
    if kind == "LORA":
        if peft.get("use_dora"):
            refuse("DoRA (use_dora)")
        if peft.get("bias", "none") not in ("none", None):
            refuse(f"bias={peft.get('bias')!r}")
        if peft.get("lora_bias"):
            refuse("lora_bias")
        if peft.get("layer_replication"):
            refuse("layer_replication")
        if peft.get("trainable_token_indices"):
            refuse("trainable_token_indices")


def _check_parameters(peft: dict[str, Any], where: str, layers: Iterable[str]) -> None:
    """Refuse an adapter of parameters that are not linear layers (PEFT's `target_parameters`: the fused experts or
    the router of a mixture-of-experts block), naming what swarm adapts instead (the blocks' linear `layers`, when
    known)."""
    targets = peft.get("target_parameters")
    if not targets:
        return
    shown = ", ".join(map(str, targets)) if isinstance(targets, list) else repr(targets)
    names = sorted({str(layer).rsplit(".", 1)[-1] for layer in layers})
    supported = f" ({', '.join(names)})" if names else ""
    raise ConfigError(f"{where} adapts parameters that are not linear layers (target_parameters: {shown:.200}), such "
                      "as the experts or the router of a mixture-of-experts block, which swarm does not support: it "
                      f"applies adapters to the blocks' linear layers{supported}, named in target_modules")


def _split_key(key: str, prefixes: dict[str, int], where: str, base: str, total: int) -> tuple[int, str]:
    if not key.startswith(PEFT_PREFIX):
        raise ConfigError(f"{where}: tensor {key!r} is not named as PEFT names a model's tensors ({PEFT_PREFIX}...)")
    best = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
    if best is None:
        layer = re.search(r"\.layers\.(\d+)\.", key)
        if layer is not None and int(layer.group(1)) >= total:
            raise ConfigError(f"{where} has tensors for block {layer.group(1)} ({key}), but this model has {total} "
                              f"blocks: it was made for another base model ({base})")
        module = key[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0].rsplit(".ia3_l", 1)[0]
        module = module.removesuffix(".weight").removesuffix(".bias").removesuffix(".base_layer")
        raise ConfigError(f"{where} targets {module!r} (tensor {key}), which is not in a block; swarm applies "
                          "adapters to the blocks' linear layers only (attention projections and MLP)")
    return prefixes[best], key[len(best):]


def _module_part(rest: str, key: str, where: str) -> tuple[str, str]:
    for suffix, part in _SUFFIXES.items():
        if rest.endswith("." + suffix):
            return rest[:-len(suffix) - 1], part
    raise ConfigError(f"{where}: tensor {key} is not a LoRA (lora_A/lora_B.weight) or (IA)^3 (ia3_l) tensor "
                      "swarm knows")


def _targets_match(targets: Any, module_key: str, module: str) -> bool:
    """Whether PEFT's `target_modules` (or `exclude_modules`, `feedforward_modules`) names the layer `module_key`
    (its full name in the model, e.g. model.layers.3.mlp.down_proj): a regex matches the full name, a list entry the
    full name or its last parts."""
    if isinstance(targets, str):
        if targets == "all-linear":
            return True
        return re.fullmatch(targets, module_key) is not None
    if isinstance(targets, (list, tuple)):
        return any(module_key == t or module_key.endswith("." + t) for t in targets if isinstance(t, str))
    return False


def _check_targets(peft: dict[str, Any], kind: str, found: dict[tuple[int, str], dict[str, str]],
                   linears: Callable[[int], dict[str, tuple[int, int]]], total: int, where: str,
                   key_of: Callable[[int, str], str]) -> None:
    """Every (block, module) the config targets has all its tensors, and nothing targets a layer outside blocks."""
    targets = peft.get("target_modules")
    listed = [t for t in targets if isinstance(t, str)] if isinstance(targets, (list, tuple)) else []
    if listed:
        keys = [key_of(block, module) for block in range(total) for module in linears(block)]
        unknown = [t for t in listed if not any(_targets_match([t], key, "") for key in keys)]
        if unknown:
            raise ConfigError(f"{where} targets {', '.join(map(repr, unknown))}, which swarm cannot adapt: it applies "
                              f"adapters to the blocks' linear layers ({', '.join(sorted(linears(0)))})")
    layers = peft.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    blocks = [i for i in range(total) if not isinstance(layers, list) or i in layers]
    needed = ("l",) if kind == "IA3" else ("A", "B")
    for (block, module), parts in found.items():
        missing = [p for p in needed if p not in parts]
        if missing:
            raise ConfigError(f"{where} is missing tensors: {module} of block {block} has no "
                              f"{' or '.join('lora_' + p if p != 'l' else 'ia3_l' for p in missing)}")
    if targets is None or (isinstance(targets, str) and targets == "all-linear"):
        return
    for block in blocks:
        for module in linears(block):
            key = key_of(block, module)
            if _targets_match(targets, key, module) and (block, module) not in found \
                    and not _excluded(peft, key, module):
                raise ConfigError(f"{where} is missing tensors: its config targets {module} of block {block}, and "
                                  "adapter_model.safetensors has none for it")


def _excluded(peft: dict[str, Any], key: str, module: str) -> bool:
    excluded = peft.get("exclude_modules")
    return excluded is not None and _targets_match(excluded, key, module)


def _pattern(patterns: Any, key: str) -> Any:
    if not isinstance(patterns, dict):
        return None
    for pattern, value in patterns.items():
        if isinstance(pattern, str) and re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return None


def _lora_op(peft: dict[str, Any], tensors: dict[str, torch.Tensor], parts: dict[str, str], block: int, module: str,
             fan_in: int, fan_out: int, family: ModelFamily, config: Any, where: str, base: str,
             dtype: torch.dtype, pool: LoraPool | None = None) -> LoraOp:
    a, b = tensors["A"], tensors["B"]
    rank = a.shape[0] if a.dim() == 2 else -1
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != fan_in or b.shape != (fan_out, rank) or rank < 1:
        raise ConfigError(f"{where} does not fit this model: {parts['A']} is {list(a.shape)} and {parts['B']} "
                          f"{list(b.shape)}, but {module} of block {block} maps {fan_in} to {fan_out} features "
                          f"(expected [r, {fan_in}] and [{fan_out}, r]; was it made for another base model? it names "
                          f"{base})")
    key = family.block_prefix(config, block) + module
    expected_rank = _pattern(peft.get("rank_pattern"), key) or peft.get("r")
    if isinstance(expected_rank, int) and expected_rank != rank:
        raise ConfigError(f"{where}: {parts['A']} has rank {rank}, its config says {expected_rank}")
    alpha = _pattern(peft.get("alpha_pattern"), key)
    if alpha is None:
        alpha = peft.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ConfigError(f"{where}: lora_alpha must be a number, got {alpha!r}")
    scaling = alpha / math.sqrt(rank) if peft.get("use_rslora") else alpha / rank
    return LoraOp(a.to(dtype).contiguous(), b.to(dtype).contiguous(), scaling, pool)


def _ia3_op(peft: dict[str, Any], scale: torch.Tensor, key: str, module: str, fan_in: int, fan_out: int,
            where: str, base: str, dtype: torch.dtype, module_key: str) -> IA3Op:
    feedforward = _targets_match(peft.get("feedforward_modules") or [], module_key, module)
    expected = (1, fan_in) if feedforward else (fan_out, 1)
    if tuple(scale.shape) != expected:
        kind = ", feed-forward" if feedforward else ""
        raise ConfigError(f"{where} does not fit this model: {key} is {list(scale.shape)}, expected "
                          f"{list(expected)} for {module} ({fan_in} -> {fan_out} features{kind}; was it made for "
                          f"another base model? it names {base})")
    return IA3Op(scale.to(dtype).contiguous(), feedforward)


def peft_lora_files(directory: str | Path, weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
                    family: ModelFamily, config: Any, rank: int, alpha: float, targets: Iterable[str],
                    base_model: str | None, task_type: str = "CAUSAL_LM",
                    extra_tensors: dict[str, torch.Tensor] | None = None,
                    modules_to_save: list[str] | None = None) -> Path:
    """Write a LoRA (weights[(block, module)] = (A [r, in], B [out, r])) as a PEFT adapter directory that
    `peft.PeftModel.from_pretrained` loads and `swarm serve --adapters` serves."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for (block, module), (a, b) in sorted(weights.items()):
        prefix = PEFT_PREFIX + family.block_prefix(config, block) + module
        tensors[f"{prefix}.lora_A.weight"] = a.detach().float().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b.detach().float().contiguous()
    tensors.update({k: v.detach().float().contiguous() for k, v in (extra_tensors or {}).items()})
    save_file(tensors, str(directory / PEFT_WEIGHTS), metadata={"format": "pt"})
    peft = {
        "peft_type": "LORA", "task_type": task_type, "r": rank, "lora_alpha": alpha,
        "target_modules": sorted({t.rsplit(".", 1)[-1] for t in targets}), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
        "base_model_name_or_path": base_model, "modules_to_save": modules_to_save, "rank_pattern": {},
        "alpha_pattern": {},
    }
    (directory / PEFT_CONFIG).write_text(json.dumps(peft, indent=2) + "\n")
    return directory


__all__ = [
    "IA3", "NAME", "PEFT_CONFIG", "PEFT_WEIGHTS", "SUPPORTED_TYPES", "DeepPrompts", "Group", "IA3Op", "Lora",
    "LoraOp", "LoraPool", "PromptOp", "Task", "TaskOp", "adapter_files", "adapter_name", "apply_after",
    "apply_before", "block_linears", "check_peft", "lora_stacked", "lora_from_stacked", "model_linears",
    "peft_lora_files", "read_peft", "read_peft_config",
]
