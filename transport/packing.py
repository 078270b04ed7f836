"""Compressed tensors on the wire: their form in a message, negotiated per request; the codes themselves are the
caller's.

A sender may send some tensors of a message compressed (hidden states and gradients: `COMPRESSIBLE`). A compressed
tensor X travels as the ordinary tensor frames of its parts, named `X#PART` in the message's `names`, and the header
field `packed` describes it: `{X: {"codec": NAME, "dtype": DTYPE, "shape": [...]}}` (DTYPE and shape: the tensor's
before compression). The receiver restores X at the place of its first part before reading the message (`unpack`), so
the typed messages of messages.py, and every check they and the server make, see the plain tensor.

Negotiation, per request: a request says how its own tensors travel (`packed`, above) and may ask, with the header
field `compress` (a codec name), for the tensors of its reply to travel compressed too; a relayed step's `push` may
carry `compress` for what its server pushes to the next one (messages.PushTarget). Servers announce the codecs they
decode as capabilities `compress.NAME` (`capabilities`, `announced`); a sender never sends a peer a codec the peer did
not announce. A peer that does not know these fields (an older one) announces none, is sent plain tensors, ignores a
`compress` it is asked for and answers plain tensors, which the asker reads as they are.

Transport knows this form, not the codes: the caller passes a `TensorCoder` (quant/compression.py's `WireCodecs`).
Anything a peer can get wrong is a ProtocolError naming it: a malformed description, a part missing or left over, a
codec the receiver does not accept, parts whose sizes do not fit the declared shape, values that decode to NaN or
infinity, shapes larger than a tensor may be. Nothing of the message is used when one of its tensors is refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch

from .codec import MAX_DIMS, MAX_TENSOR_BYTES, MAX_TENSORS, Message, dtype_from_name, dtype_name
from .errors import ProtocolError

PACKED = "packed"  # header field describing the compressed tensors of a message
COMPRESS = "compress"  # header field of a request: the codec its reply's tensors may travel in
SEPARATOR = "#"  # X#PART names a part of the compressed tensor X
CAPABILITY = "compress."  # a server decoding codec NAME announces the capability "compress.NAME"
COMPRESSIBLE = frozenset({"hidden", "grad_output", "grad_input"})  # the tensors senders compress
MAX_CODEC_CHARS = 16
MAX_PARTS = 4  # parts of one compressed tensor


class TensorCoder(Protocol):
    """Codes by name: `encode` gives a tensor's parts (None: send it as it is), `decode` rebuilds it or raises
    ValueError."""

    names: tuple[str, ...]  # the codecs it encodes and decodes (besides "none")

    def encode(self, codec: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None: ...

    def decode(self, codec: str, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...],
               dtype: torch.dtype) -> torch.Tensor: ...


def capabilities(codecs: Iterable[str]) -> tuple[str, ...]:
    """The capability names announcing `codecs` ("none" needs none)."""
    return tuple(f"{CAPABILITY}{c}" for c in codecs if c != "none")


def announced(capabilities: Iterable[str] | None) -> tuple[str, ...]:
    """The codecs a peer that announced `capabilities` decodes (an older peer: none)."""
    return tuple(c[len(CAPABILITY):] for c in capabilities or () if c.startswith(CAPABILITY))


def pack(fields: dict[str, Any], tensors: Sequence[torch.Tensor], codec: str | None, coder: TensorCoder,
         compressible: Iterable[str] = COMPRESSIBLE) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """`fields` and `tensors` of a message with its compressible tensors encoded by `codec` (None or "none": as they
    are). Only named tensors (`names`) are packed; a tensor the coder has no faithful code for stays plain."""
    names = fields.get("names")
    if codec in (None, "none") or not isinstance(names, list) or len(names) != len(tensors):
        return fields, list(tensors)
    wanted = set(compressible)
    out_names: list[str] = []
    out: list[torch.Tensor] = []
    packed: dict[str, Any] = {}
    for name, tensor in zip(names, tensors, strict=True):
        parts = coder.encode(codec, tensor) if name in wanted else None
        if parts is None:
            out_names.append(name)
            out.append(tensor)
            continue
        packed[name] = {"codec": codec, "dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape)}
        for part, value in parts.items():
            out_names.append(f"{name}{SEPARATOR}{part}")
            out.append(value)
    if not packed:
        return fields, list(tensors)
    return {**fields, "names": out_names, PACKED: packed}, out


def asked(message: Message, coder: TensorCoder) -> str | None:
    """The codec a request asks its reply's tensors in (None: plain); a codec this peer does not send is refused."""
    return read_codec(message.fields.get(COMPRESS), coder, f"{message.type}: field {COMPRESS!r}")


def read_codec(value: Any, coder: TensorCoder, where: str) -> str | None:
    """A codec name a peer asked for (None and "none": no compression), checked against what `coder` knows."""
    if value is None or value == "none":
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_CODEC_CHARS:
        raise ProtocolError(f"{where} must be a codec name, got {_short(value)}")
    if value not in coder.names:
        raise ProtocolError(f"{where}: compression {value!r} is not one this peer speaks (it speaks: "
                            f"{', '.join(('none', *coder.names))})")
    return value


def unpack(message: Message, coder: TensorCoder) -> Message:
    """`message` with its compressed tensors decoded (as it is when it has none); raises ProtocolError."""
    packed = message.fields.get(PACKED)
    if packed is None:
        return message
    where = f"{message.type}: compressed tensors"
    if not isinstance(packed, dict) or not 0 < len(packed) <= MAX_TENSORS:
        raise ProtocolError(f"{where}: field {PACKED!r} must map 1 to {MAX_TENSORS} tensor names to descriptions")
    names = message.fields.get("names")
    if not isinstance(names, list) or len(names) != len(message.tensors) or not all(isinstance(n, str) for n in names):
        raise ProtocolError(f"{where}: field 'names' must name each of the {len(message.tensors)} tensors")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    order: list[str] = []
    plain: dict[str, torch.Tensor] = {}
    for name, tensor in zip(names, message.tensors, strict=True):
        base, sep, part = name.partition(SEPARATOR)
        if not sep:
            if name in plain or name in packed:
                raise ProtocolError(f"{where}: tensor {_short(name)} comes twice")
            plain[name] = tensor
            order.append(name)
            continue
        if base not in packed:
            raise ProtocolError(f"{where}: {_short(name)} is a part of {_short(base)}, which {PACKED!r} does not "
                                "describe")
        group = groups.setdefault(base, {})
        if not group:
            order.append(base)
        if part in group or len(group) >= MAX_PARTS:
            raise ProtocolError(f"{where}: {_short(base)} has a part twice, or more than {MAX_PARTS} parts")
        group[part] = tensor
    missing = [n for n in packed if n not in groups]
    if missing:
        raise ProtocolError(f"{where}: no part of {_short(missing[0])} came")
    decoded = {base: _decode(base, packed[base], groups[base], coder, where) for base in groups}
    fields = {k: v for k, v in message.fields.items() if k != PACKED}
    fields["names"] = order
    tensors = tuple(plain[n] if n in plain else decoded[n] for n in order)
    return Message(type=message.type, id=message.id, fields=fields, tensors=tensors, version=message.version)


def _decode(name: str, spec: Any, parts: dict[str, torch.Tensor], coder: TensorCoder, where: str) -> torch.Tensor:
    if not isinstance(spec, dict):
        raise ProtocolError(f"{where}: the description of {_short(name)} must be {{codec, dtype, shape}}")
    codec = read_codec(spec.get("codec"), coder, f"{where}: {_short(name)}'s codec")
    if codec is None:
        raise ProtocolError(f"{where}: {_short(name)} names no codec")
    dtype = dtype_from_name(spec.get("dtype"))
    if not dtype.is_floating_point:
        raise ProtocolError(f"{where}: {_short(name)} must decode into a float dtype, not {spec.get('dtype')!r}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS \
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(f"{where}: the shape of {_short(name)} must be a list of at most {MAX_DIMS} sizes, got "
                            f"{_short(shape)}")
    span = math.prod(d for d in shape if d) * dtype.itemsize
    if span > MAX_TENSOR_BYTES:
        raise ProtocolError(f"{where}: {_short(name)} would take {span} bytes decoded, more than {MAX_TENSOR_BYTES}")
    try:
        tensor = coder.decode(codec, parts, tuple(shape), dtype)
    except (ValueError, RuntimeError, TypeError) as e:
        raise ProtocolError(f"{where}: {_short(name)} ({codec}): {e}") from None
    if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:  # a coder that breaks its contract
        raise ProtocolError(f"{where}: {_short(name)} did not decode into {spec.get('dtype')}{shape}")
    return tensor


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


__all__ = ["CAPABILITY", "COMPRESS", "COMPRESSIBLE", "PACKED", "TensorCoder", "announced", "asked", "capabilities",
           "pack", "read_codec", "unpack"]
