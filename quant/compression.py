"""Lossy codes for hidden states and gradients on the wire: pure functions from a float tensor to plain tensors and
back.

Codecs (`CODECS`):
- `none`: the tensor as it is (nothing to encode);
- `float16`, `bfloat16`: the values rounded to that 16-bit float (half the bytes of float32). A tensor with values
  beyond the code's range (float16: |x| > 65504) or with NaN/inf has no faithful code: `encode` answers None and the
  sender sends it plain;
- `int8`: a blockwise absmax code. The flattened tensor is cut into blocks of `BLOCK` consecutive values (the last one
  shorter); each block stores its largest-magnitude value as it is (float32, and its place in the block, uint8), and
  the others as int8 codes round(x / scale) in [-127, 127] with one float32 scale (the largest magnitude left / 127).
  1.14 bytes a value, 28% of float32. Each value is off by at most half its block's scale (|x - x'| <= the block's
  second largest magnitude / 254), so a block of small values keeps its precision next to a block with an outlier,
  and so does a block holding one of the few huge activations of a transformer's residual stream (SmolLM2's reach
  ~25,000 where the rest are ~100: a plain absmax scale would round the other 63 values of that block to ~100).

`encode(codec, tensor)` gives the parts (a name -> tensor map); `decode(codec, parts, shape, dtype)` rebuilds the
tensor of `shape` in float `dtype` and checks everything a peer could get wrong: part names, dtypes and sizes against
the shape and the block size, codes in range, scales finite, non-negative and small enough that no value decodes
to infinity, and a result without NaN or infinity. Any problem is a `ValueError` naming it; nothing here knows
sockets (the transport turns these errors into protocol errors).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .codecs import CODECS, SETTINGS, choose

BLOCK = 64  # values per int8 block (a scale, an outlier and its place each: 9/64 byte per value of overhead)
MAX_VALUES = 1 << 29  # values one decoded tensor may hold (2 GiB of float32)
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # dtypes a tensor may be decoded into
_HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def parts_of(codec: str) -> tuple[str, ...]:
    """The names of the parts a tensor encoded with `codec` travels as (raises ValueError for an unknown codec)."""
    if codec in _HALF:
        return ("values",)
    if codec == "int8":
        return ("codes", "scales", "outliers", "positions")
    raise ValueError(f"unknown compression {codec!r}; known: {', '.join(CODECS)}")


def encode(codec: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """The parts of `tensor` under `codec`; None when it is better sent as it is (codec `none`, not a float tensor,
    NaN/inf values, or values beyond what a 16-bit code holds)."""
    if codec != "none":
        parts_of(codec)  # an unknown name is a ValueError, not a silent plain tensor
    if codec == "none" or not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    flat = tensor.detach().reshape(-1)
    if not torch.isfinite(flat).all():
        return None
    if codec in _HALF:
        values = flat.to(_HALF[codec])
        if not torch.isfinite(values).all():  # beyond float16's range
            return None
        return {"values": values}
    return encode_int8(flat)


def encode_int8(flat: torch.Tensor, block: int = BLOCK) -> dict[str, torch.Tensor]:
    """Blockwise absmax int8 of a finite 1-D tensor of n values: each block's largest magnitude as it is
    (`outliers` float32 and `positions` uint8 within the block, [blocks]), the others as `codes` int8 [n] (0 at the
    outliers' places) times `scales` float32 [blocks] (the largest magnitude left / 127)."""
    n = flat.numel()
    blocks = -(-n // block)
    padded = torch.zeros(blocks * block, dtype=torch.float32, device=flat.device)
    padded[:n] = flat.to(torch.float32)
    rows = padded.view(blocks, block)
    positions = rows.abs().argmax(dim=1, keepdim=True)  # a real value's place (padding is 0, the first wins ties)
    outliers = rows.gather(1, positions).squeeze(1)
    rest = rows.scatter(1, positions, 0.0)
    scales = rest.abs().amax(dim=1) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(rest / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return {"codes": codes.reshape(-1)[:n].clone(), "scales": scales, "outliers": outliers,
            "positions": positions.squeeze(1).to(torch.uint8)}


def decode_int8(parts: Mapping[str, torch.Tensor], block: int = BLOCK) -> torch.Tensor:
    """float32 values of `encode_int8`'s parts (no checks: see `decode`)."""
    codes, scales = parts["codes"], parts["scales"]
    n, blocks = codes.numel(), scales.numel()
    padded = torch.zeros(blocks * block, dtype=torch.float32, device=codes.device)
    padded[:n] = codes.to(torch.float32)
    rows = padded.view(blocks, block) * scales[:, None]
    rows.scatter_(1, parts["positions"].long()[:, None], parts["outliers"][:, None])
    return rows.reshape(-1)[:n]


def decode(codec: str, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...] | list[int],
           dtype: torch.dtype) -> torch.Tensor:
    """The tensor of `shape` in `dtype` that `parts` encode under `codec`; raises ValueError on anything malformed."""
    expected = parts_of(codec)
    if set(parts) != set(expected):
        raise ValueError(f"{codec} needs parts {list(expected)}, got {sorted(parts)}")
    if dtype not in FLOATS:
        raise ValueError(f"a compressed tensor decodes into a float dtype, not {dtype}")
    shape = tuple(shape)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"bad shape {list(shape)}")
    n = math.prod(shape)
    if n > MAX_VALUES:
        raise ValueError(f"shape {list(shape)} holds {n} values, more than {MAX_VALUES}")
    if codec in _HALF:
        values = _part(parts, "values", _HALF[codec], n)
        if not torch.isfinite(values).all():
            raise ValueError(f"{codec} values hold NaN or infinity")
        out = values.to(dtype)
    else:
        out = _decode_int8(parts, n).to(dtype)
    if not torch.isfinite(out).all():
        raise ValueError(f"values decode beyond what {str(dtype).removeprefix('torch.')} holds")
    return out.reshape(shape)


def _decode_int8(parts: Mapping[str, torch.Tensor], n: int) -> torch.Tensor:
    blocks = -(-n // BLOCK)
    codes = _part(parts, "codes", torch.int8, n)
    scales = _part(parts, "scales", torch.float32, blocks)
    outliers = _part(parts, "outliers", torch.float32, blocks)
    positions = _part(parts, "positions", torch.uint8, blocks)
    if not torch.isfinite(scales).all() or (scales < 0).any():
        raise ValueError("int8 scales must be finite and non-negative")
    if not torch.isfinite(outliers).all():
        raise ValueError("int8 outliers must be finite")
    if (codes == -128).any():
        raise ValueError("int8 codes must lie in [-127, 127]")
    if blocks and ((positions[:-1] >= BLOCK).any() or int(positions[-1]) >= n - (blocks - 1) * BLOCK):
        raise ValueError(f"int8 positions must lie within their block of {BLOCK} values (the last one's length)")
    return decode_int8(parts)


def _part(parts: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype, count: int) -> torch.Tensor:
    part = parts[name]
    if part.dtype != dtype or part.dim() != 1 or part.numel() != count:
        got = f"{str(part.dtype).removeprefix('torch.')}{list(part.shape)}"
        raise ValueError(f"part {name!r} must be {str(dtype).removeprefix('torch.')}[{count}], got {got}")
    return part


def max_error(codec: str, tensor: torch.Tensor) -> float:
    """The largest absolute error `codec` may add to one value of `tensor` (the round trip stays within it)."""
    if codec == "none":
        return 0.0
    x = tensor.detach().float().reshape(-1)
    if codec in _HALF:
        eps = torch.finfo(_HALF[codec]).eps  # relative spacing; rounding is off by at most half of it
        tiny = torch.finfo(_HALF[codec]).smallest_normal * eps  # subnormals: absolute spacing
        return float(x.abs().max()) * eps / 2 + tiny if x.numel() else 0.0
    parts_of(codec)
    n = x.numel()
    padded = torch.zeros(-(-n // BLOCK) * BLOCK)
    padded[:n] = x.abs()
    rows = padded.view(-1, BLOCK).sort(dim=1, descending=True).values
    # the largest value of a block travels as it is; the others are off by at most half a step of the next largest
    return float(rows[:, 1].max()) / 254 * (1 + 1e-5) if n > 1 else 0.0


class WireCodecs:
    """The codecs as the transport uses them (transport/packing.py's `TensorCoder`): `encode`/`decode` by name, over
    the codecs given (all by default; a server may accept fewer)."""

    def __init__(self, names: tuple[str, ...] = CODECS[1:]):
        unknown = [n for n in names if n not in CODECS[1:]]
        if unknown:
            raise ValueError(f"unknown compression {unknown[0]!r}; known: {', '.join(CODECS)}")
        self.names = tuple(names)

    def encode(self, codec: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
        return encode(codec, tensor) if codec in self.names else None

    def decode(self, codec: str, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...],
               dtype: torch.dtype) -> torch.Tensor:
        if codec not in self.names:
            accepted = ", ".join(self.names) or "none"
            raise ValueError(f"compression {codec!r} is not accepted here (accepted: {accepted})")
        return decode(codec, parts, shape, dtype)


__all__ = ["BLOCK", "CODECS", "SETTINGS", "WireCodecs", "choose", "decode", "decode_int8", "encode", "encode_int8",
           "max_error", "parts_of"]
