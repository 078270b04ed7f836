"""Wire codec: one msgpack header frame, then one raw frame per tensor.

A message is a list of ZeroMQ frames. The first is a msgpack map with the protocol version (`v`), the message type
(`type`), the request id (`id`), the list of tensor specs (`tensors`: dtype name and shape) and any other fields of
the message. Each following frame is the contiguous buffer of one tensor, in order. No pickle anywhere: the only
decoder is msgpack with plain types, and tensor bytes are checked against their declared dtype and shape.

A newer peer may add header fields; `decode` keeps unknown fields in `Message.fields` and callers ignore what they
do not use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from .errors import ProtocolError, VersionMismatch
from .records import PROTOCOL_VERSION  # stated once, in a module the command line imports without torch

MAX_HEADER_BYTES = 1 << 20  # a header is small; anything bigger is refused before msgpack parses it
MAX_TENSORS = 64  # tensors in one message
MAX_TENSOR_BYTES = 1 << 31  # one tensor's buffer (2 GiB)
MAX_DIMS = 8

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_RESERVED = frozenset({"v", "type", "id", "tensors"})


@dataclass(frozen=True)
class Message:
    """A decoded message: its type, request id, header fields and tensors."""

    type: str
    id: int
    fields: dict[str, Any] = field(default_factory=dict)
    tensors: tuple[torch.Tensor, ...] = ()
    version: int = PROTOCOL_VERSION

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype (raises ProtocolError for dtypes that do not travel)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ProtocolError(f"dtype {dtype} cannot be sent") from None


def dtype_from_name(name: Any) -> torch.dtype:
    """The torch dtype for a wire name (raises ProtocolError for unknown names)."""
    if not isinstance(name, str) or name not in _DTYPES:
        raise ProtocolError(f"unknown dtype {name!r}; known: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _tensor_frame(tensor: torch.Tensor) -> memoryview:
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    flat = tensor.reshape(-1).view(torch.uint8) if tensor.numel() else torch.empty(0, dtype=torch.uint8)
    return memoryview(flat.numpy())


def encode(msg_type: str, request_id: int, fields: dict[str, Any] | None = None,
           tensors: Sequence[torch.Tensor] = (), version: int = PROTOCOL_VERSION) -> list[Any]:
    """Frames for one message. Tensor frames share memory with the tensors (sent without copies where possible)."""
    header: dict[str, Any] = dict(fields or {})
    clash = _RESERVED.intersection(header)
    if clash:
        raise ValueError(f"reserved header fields: {sorted(clash)}")
    header["v"] = version
    header["type"] = msg_type
    header["id"] = request_id
    header["tensors"] = [[dtype_name(t.dtype), list(t.shape)] for t in tensors]
    return [msgpack.packb(header, use_bin_type=True), *(_tensor_frame(t) for t in tensors)]


def _buffer(frame: Any) -> memoryview:
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


def _shape(spec: Any) -> tuple[torch.dtype, tuple[int, ...]]:
    if not isinstance(spec, (list, tuple)) or len(spec) != 2:
        raise ProtocolError("a tensor spec must be [dtype, shape]")
    dtype = dtype_from_name(spec[0])
    shape = spec[1]
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_DIMS:
        raise ProtocolError(f"a tensor shape must be a list of at most {MAX_DIMS} sizes")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(f"bad tensor shape {shape!r}")
    # a zero dimension empties the tensor but does not make the others harmless: torch computes strides from all
    # of them (and overflows), so the non-zero dimensions together must fit in one tensor's buffer
    span = math.prod(d for d in shape if d) * dtype.itemsize
    if span > MAX_TENSOR_BYTES:
        raise ProtocolError(f"tensor {spec[0]}{list(shape)} is larger than a tensor may be: its non-zero dimensions "
                            f"span {span} bytes, more than {MAX_TENSOR_BYTES}")
    return dtype, tuple(shape)


def decode_header(frame: Any) -> dict[str, Any]:
    """Parse and check the header frame (version, type, id) without touching tensor frames."""
    raw = _buffer(frame)
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes is larger than {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"header is not valid msgpack: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a map")
    version = header.get("v")
    if not isinstance(version, int) or isinstance(version, bool) or version != PROTOCOL_VERSION:
        raise VersionMismatch(f"protocol version {version!r} is not supported (this peer speaks {PROTOCOL_VERSION})")
    if not isinstance(header.get("type"), str):
        raise ProtocolError("header has no message type")
    request_id = header.get("id")
    if not isinstance(request_id, int) or isinstance(request_id, bool) or not 0 <= request_id < 1 << 63:
        raise ProtocolError("header has no valid request id")
    return header


def decode(frames: Sequence[Any], header: dict[str, Any] | None = None) -> Message:
    """Decode frames into a Message; raises ProtocolError (or VersionMismatch) on anything malformed.

    `header` is `decode_header(frames[0])` when the caller has it already (it is not parsed twice).
    """
    if not frames:
        raise ProtocolError("empty message")
    if header is None:
        header = decode_header(frames[0])
    specs = header.get("tensors", [])
    if not isinstance(specs, list) or len(specs) > MAX_TENSORS:
        raise ProtocolError(f"a message carries a list of at most {MAX_TENSORS} tensors")
    if len(specs) != len(frames) - 1:
        raise ProtocolError(f"header declares {len(specs)} tensors but {len(frames) - 1} tensor frames came")
    tensors = []
    for spec, frame in zip(specs, frames[1:], strict=True):
        dtype, shape = _shape(spec)
        buf = _buffer(frame)
        expected = math.prod(shape) * dtype.itemsize  # at most MAX_TENSOR_BYTES: _shape checked it
        if len(buf) != expected:
            raise ProtocolError(f"tensor frame has {len(buf)} bytes, {expected} expected for {spec[0]}{list(shape)}")
        if expected == 0:
            tensors.append(torch.empty(shape, dtype=dtype))
        else:
            tensors.append(torch.frombuffer(bytearray(buf), dtype=dtype).reshape(shape))
    fields = {k: v for k, v in header.items() if k not in _RESERVED}
    return Message(type=header["type"], id=header["id"], fields=fields, tensors=tuple(tensors),
                   version=header["v"])
