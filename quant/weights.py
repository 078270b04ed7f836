"""Weight quantization of a block's linear layers through bitsandbytes: 8-bit LLM.int8 and 4-bit NF4.

`quantize_block(block, mode, compute_dtype, device)` replaces every `nn.Linear` of a block (built and loaded in 16/32
bits on the CPU) by its bitsandbytes twin and moves the block to `device`; bitsandbytes quantizes each weight on that
move (`Int8Params` and `Params4bit` quantize when they leave the CPU or, for the CPU itself, on `.to("cpu")`), so the
CPU and CUDA take the one path bitsandbytes documents: build on the CPU, convert on the move to the device. A loader
that calls it block by block holds at most one block in 16/32 bits at a time.

- `int8`: `bnb.nn.Linear8bitLt` (LLM.int8, Dettmers et al. 2022) with `has_fp16_weights=False`: the weight is stored
  as int8 rows with one float32 scale per output row (absmax / 127); inputs are quantized per token, and the input
  columns holding a value above the outlier threshold (6.0, the paper's and bitsandbytes' usual value) are multiplied
  in 16 bits. Which columns count as outliers depends on every token of a pass, so a token's output may differ in the
  last bits with what is batched beside it.
- `nf4`: `bnb.nn.Linear4bit` with the NF4 code (QLoRA, Dettmers et al. 2023), blocks of 64 weights with one absmax each,
  computing in `compute_dtype` (the server's dtype). Double quantization is on: the per-block absmax scales are
  themselves stored in 8 bits (blocks of 256, float32 scales), 4.13 bits per weight instead of 4.5 (0.37 bit, ~8%
  of a 4-bit model) for an error the QLoRA paper measured as none; here too: SmolLM2-135M's 30 blocks in nf4 take
  52.6 MiB with it, 57.1 without, and its logits differ from float32 by 0.584 (relative) with, 0.582 without.
  The CPU repacking bitsandbytes does on the first no-grad call on AVX512-BF16 machines is switched off
  (`support_avx512bf16_for_cpu = False`): once repacked, a layer computes in bfloat16 whatever the compute dtype, and
  its later calls with gradients go through a kernel without a backward (bitsandbytes 0.50 then returns no gradient
  for the inputs, silently); a server answers both, so it keeps the one path that is right for both.

Both twins subclass `nn.Linear` (hooks registered on linear layers find them), and both give gradients w.r.t. their
inputs (the weights stay frozen): backward through a quantized block works, and LoRA on top of it is QLoRA.

`weight_bytes(module)` is what a module's weights take in memory once quantized (quantized weights, their scales and
codes, and every other parameter and buffer); `planned_bytes(module, mode, dtype)` is the same figure computed for a
block that is not loaded (built on the meta device), for memory planning. bitsandbytes is imported on first use only.
This package knows tensors and modules, nothing of the rest of swarm.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

MODES = ("none", "int8", "nf4")  # weight quantizations; `none` keeps the linear layers in the server's dtype
INT8_THRESHOLD = 6.0  # LLM.int8 outlier threshold: input columns with a larger value are multiplied in 16 bits
NF4_BLOCKSIZE = 64  # weights per NF4 absmax scale (bitsandbytes' default)
DOUBLE_QUANT = True  # NF4 absmax scales stored in 8 bits themselves (QLoRA's double quantization)
NESTED_BLOCKSIZE = 256  # absmax scales per float32 scale, with double quantization (bitsandbytes' choice)
NF4_CODE = 16  # float32 values of the NF4 code
NESTED_CODE = 256  # float32 values of the 8-bit dynamic code the scales are stored in

log = logging.getLogger(__name__)


class _DropCastNotice(logging.Filter):
    """Drops bitsandbytes' per-call notice that int8 inputs are cast to float16 (it is how LLM.int8 works, said on
    every call of every layer: a server would log it thousands of times a second)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


_CAST_NOTICE = _DropCastNotice()


def check_mode(mode: str) -> str:
    """`mode` when it is one of MODES; ValueError otherwise."""
    if mode not in MODES:
        raise ValueError(f"weight quantization must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def bitsandbytes() -> Any:
    """The bitsandbytes module, imported on first use (ImportError with what to install when it is missing)."""
    backend = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = backend.level
    # its import warns, on AVX512-BF16 CPUs, that an optional hub kernel for the repacked CPU path is missing: that
    # path is switched off here (see the module's docstring), so the warning concerns nothing swarm runs
    backend.setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError(f"8-bit and 4-bit weights need bitsandbytes (pip install bitsandbytes): {e}") from e
    finally:
        backend.setLevel(level)
    functions = logging.getLogger("bitsandbytes.autograd._functions")
    if _CAST_NOTICE not in functions.filters:
        functions.addFilter(_CAST_NOTICE)
    return bnb


def quantize_block(block: nn.Module, mode: str, compute_dtype: torch.dtype,
                   device: torch.device | str = "cpu") -> nn.Module:
    """`block` (loaded on the CPU in `compute_dtype`) with its linear layers quantized as `mode`, moved to `device`.

    Every `nn.Linear` is replaced by its bitsandbytes twin, which takes the layer's float weight without a copy; the
    move to `device` quantizes each weight and frees its float copy (the block's other tensors are copied out of the
    checkpoint's memory map, see `_own_storage`). `none` only moves the block."""
    check_mode(mode)
    if mode != "none":
        bnb = bitsandbytes()
        for parent, name, linear in list(_linears(block)):
            setattr(parent, name, _twin(bnb, linear, mode, compute_dtype))
        _own_storage(block)
    return block.to(device)


def quantized_mode(module: nn.Module) -> str:
    """The quantization of a module's linear layers: int8 or nf4 when any is quantized so, else none."""
    for m in module.modules():
        kind = _kind(m)
        if kind != "none":
            return kind
    return "none"


def weight_bytes(module: nn.Module) -> int:
    """Bytes a module's weights take in memory: parameters and buffers as stored (int8 rows, packed 4-bit pairs),
    plus the quantization statistics bitsandbytes keeps beside them (scales, codes); each storage counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in (*module.parameters(), *module.buffers(), *_statistics(module)):
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.device.type != "meta" \
            else (id(tensor), 0)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def planned_bytes(module: nn.Module, mode: str, dtype: torch.dtype) -> int:
    """What `weight_bytes` will say of `module` (built on the meta device, say) once loaded in `dtype` and quantized
    as `mode`, computed from its shapes without touching a weight."""
    check_mode(mode)
    size = torch.empty((), dtype=dtype).element_size()
    linear_weights: set[int] = set()
    total = 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            linear_weights.add(id(m.weight))
            total += _linear_bytes(m.out_features, m.in_features, mode, size)
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) not in linear_weights:
            total += tensor.numel() * size
    return total


def _linear_bytes(rows: int, columns: int, mode: str, size: int) -> int:
    """Bytes of one linear layer's weight (rows x columns) quantized as `mode`, with its statistics."""
    count = rows * columns
    if mode == "none":
        return count * size
    if mode == "int8":
        return count + rows * 4  # int8 weights, one float32 scale per row
    blocks = math.ceil(count / NF4_BLOCKSIZE)
    packed = (count + 1) // 2
    if not DOUBLE_QUANT:
        return packed + blocks * 4 + NF4_CODE * 4
    # 8-bit scales, their float32 scales per NESTED_BLOCKSIZE, the offset subtracted from them, and both codes
    return packed + blocks + math.ceil(blocks / NESTED_BLOCKSIZE) * 4 + 4 + NF4_CODE * 4 + NESTED_CODE * 4


def _linears(module: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute name, layer) of every plain `nn.Linear` under `module` (quantized ones are left alone)."""
    for parent in module.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and _kind(child) == "none":
                yield parent, name, child


def _twin(bnb: Any, linear: nn.Linear, mode: str, compute_dtype: torch.dtype) -> nn.Linear:
    """The bitsandbytes layer of `mode` holding `linear`'s weight and bias (not quantized yet: the move to a device
    does it). Built on the meta device, so no second float weight is ever allocated."""
    bias = linear.bias is not None
    if mode == "int8":
        twin = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                   threshold=INT8_THRESHOLD, device="meta")
        twin.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    else:
        twin = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                 compress_statistics=DOUBLE_QUANT, quant_type="nf4", quant_storage=torch.uint8,
                                 device="meta")
        twin.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, blocksize=NF4_BLOCKSIZE,
                                        compress_statistics=DOUBLE_QUANT, quant_type="nf4",
                                        quant_storage=torch.uint8, module=twin)
        twin.support_avx512bf16_for_cpu = False  # see the module's docstring: one numerical path, with gradients
    if bias:
        twin.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    twin.requires_grad_(False)
    return twin.train(linear.training)


def _own_storage(block: nn.Module) -> None:
    """Give the tensors left in 16/32 bits (norms, biases: a few KiB) storage of their own. Tensors read from a
    safetensors file share its memory map, which one of them is enough to keep: the float weights just quantized
    would stay mapped, counted in the process's resident memory until the kernel reclaims them."""
    for module in block.modules():
        if _kind(module) != "none":
            for param in module.parameters(recurse=False):
                if param.dtype.is_floating_point and param.dtype.itemsize > 1:  # a bias; not the quantized weight
                    param.data = param.data.clone()
            continue
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            tensor.data = tensor.data.clone()


def _kind(module: nn.Module) -> str:
    """int8 or nf4 for a bitsandbytes linear layer, else none (without importing bitsandbytes)."""
    names = {cls.__name__ for cls in type(module).__mro__}
    if "Linear8bitLt" in names:
        return "int8"
    if "Linear4bit" in names:
        return "nf4"
    return "none"


def _statistics(module: nn.Module) -> Iterator[torch.Tensor]:
    """The tensors bitsandbytes keeps beside the quantized weights of `module`'s layers (outside `parameters()`)."""
    for m in module.modules():
        kind = _kind(m)
        if kind == "int8":
            for owner in (m.weight, m.state):
                for name in ("CB", "SCB"):
                    value = getattr(owner, name, None)
                    if isinstance(value, torch.Tensor):
                        yield value
        elif kind == "nf4":
            state = getattr(m.weight, "quant_state", None)
            while state is not None:
                for name in ("absmax", "code", "offset"):
                    value = getattr(state, name, None)
                    if isinstance(value, torch.Tensor):
                        yield value
                state = getattr(state, "state2", None)


__all__ = ["DOUBLE_QUANT", "INT8_THRESHOLD", "MODES", "NF4_BLOCKSIZE", "bitsandbytes", "check_mode",
           "planned_bytes", "quantize_block", "quantized_mode", "weight_bytes"]
