"""Wire messages: one frozen type per request (and per reply that carries more than an acknowledgement), defined once
below both client and server.

A request type knows its wire form: `to_wire()` gives `(type, fields, tensors)` for `RpcClient.call`, and the
classmethod `from_wire(message)` turns a decoded `codec.Message` back into the type, checking ONCE everything that does
not depend on the receiver's state (field types and ranges, which tensors come and under what names, their ranks and
dtypes, shapes that must agree with each other) and raising `ProtocolError` (code `bad_request`) with a message a peer
can act on. What depends on the server (its span, hidden size, limits, sessions, finite values in its dtype) stays
with the server.

Requests (type: fields [tensors]; `?` optional):
- `ping`: {} and `info`: {}
- `forward`: {blocks?, names, keep?, adapter?, lora_scaling?} [hidden, attention_mask?, prompts?, lora_a.M?, lora_b.M?]
- `backward`: {blocks?, names, kept?, adapter?, lora_scaling?} [hidden, grad_output, attention_mask?, prompts?,
  lora_a.M?, lora_b.M?]
- `open`: {batch_size?, max_length, blocks?, adapter?, lora_scaling?} [lora_a.M?, lora_b.M?]
- `step`: {session, start?, names, push?} [hidden, attention_mask?, prompts?]
- `step` (relayed, input pushed by the previous server): {session, start?, names, ticket, wait?, push?}
  [attention_mask?, prompts?]
- `push`: {session, ticket, names} [hidden]
- `cancel`: {session, ticket} and `close`: {session}
(`gossip` is transport/gossip.py's own; a step's `push` is {peer, session, ticket, compress?}.) `names` lists the
tensors' names in order; absent, the tensors are the type's required ones in order. Unknown header fields are
ignored (a newer peer may add some); an unknown tensor name is refused, since a tensor left out would change the
result.
Hidden states and gradients (hidden, grad_output, and the replies' hidden and grad_input) may travel compressed: the
header fields `packed` and `compress` and the `X#PART` tensor names of transport/packing.py, decoded before a message
reaches `from_wire` (the types here see plain tensors).

Tensors: hidden float [batch, length, hidden]; attention_mask integer (or bool) [batch, length] of 0 and 1; prompts
float [blocks, batch or 1, prompt_length <= length, hidden] (deep prompts, one per block); grad_output float, the shape
of hidden. `adapter` names a parameter-efficient adapter the server holds (or can load); a session's steps run with its
`open`'s adapter. A LoRA the client owns (and trains) travels as `lora_a.M` [blocks, r, in] and `lora_b.M`
[blocks, out, r] per linear layer M of the blocks (e.g. `lora_a.self_attn.q_proj`) with `lora_scaling`; a backward
with one answers its gradients as `grad_lora_a.M` / `grad_lora_b.M`.

The protocol version is `codec.PROTOCOL_VERSION`, checked by the codec on every message. Features a peer may or may
not have are named in `CAPABILITIES` (announced in `info` and in server records; see `supports`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .codec import Message
from .errors import PeerUnreachable, ProtocolError, UnknownMethod
from .rpc import RESULT, normalize_endpoint

MAX_WAIT = 600.0  # seconds a relayed step may wait for its pushed input
DEFAULT_WAIT = 60.0  # what a relayed step without `wait` waits
MAX_ID_CHARS = 64  # session ids, tickets, kept-graph ids
MAX_CAPABILITIES = 64  # names read from a peer's capability list
MAX_CAPABILITY_CHARS = 32

# features this version implements, announced so a peer can tell what another supports before using it:
# relay: relayed steps (ticket/wait/push, `push`, `cancel`); keep: forward `keep` and backward `kept`;
# prompts: deep prompts in forward/backward/step; rewind: step `start` (the server drops its cache beyond it);
# adapters: `adapter` in open/forward/backward; lora: a client's LoRA in open/forward/backward (and its gradients)
CAPABILITIES: tuple[str, ...] = ("relay", "keep", "prompts", "rewind", "adapters", "lora")
MAX_ADAPTER_CHARS = 100  # an adapter's name
MAX_LORA_MODULES = 32  # linear layers one LoRA may target per block
_MODULE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]{0,63}")
_ADAPTER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,99}")

Fields = dict[str, Any]
Wire = tuple[str, Fields, list[torch.Tensor]]


def supports(capabilities: Iterable[str] | None, feature: str) -> bool:
    """Whether a peer that announced `capabilities` (None: announced nothing) has `feature`."""
    return capabilities is not None and feature in capabilities


def parse_capabilities(value: Any) -> tuple[str, ...]:
    """A peer's announced capability list as a tuple of names, leniently: anything that is not a short string is
    ignored (an unknown name is simply a feature this peer does not know)."""
    if not isinstance(value, (list, tuple)):
        return ()
    names = [v for v in value[:MAX_CAPABILITIES] if isinstance(v, str) and 0 < len(v) <= MAX_CAPABILITY_CHARS]
    return tuple(dict.fromkeys(names))


def require_finite(name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Raise ProtocolError when `tensor` (converted to `dtype`, the dtype it will be computed in) has NaN or
    infinite values. Not part of `from_wire`: the dtype is the receiver's."""
    if not torch.isfinite(tensor if dtype is None else tensor.to(dtype)).all():
        raise ProtocolError(f"{name} has NaN or infinite values")


# --- reading fields --------------------------------------------------------------------------------------------------


class _Reader:
    """Typed access to one message's fields and tensors; every problem is a ProtocolError naming the message type."""

    def __init__(self, message: Message, expected_type: str):
        if message.type != expected_type:
            raise ProtocolError(f"expected a {expected_type!r} message, got {message.type!r}")
        self.message, self.kind = message, expected_type

    def bad(self, text: str) -> ProtocolError:
        return ProtocolError(f"{self.kind}: {text}")

    def get(self, name: str) -> Any:
        return self.message.fields.get(name)

    def int(self, name: str, low: int = 0, default: int | None = None) -> int | None:
        value = self.get(name)
        if value is None:
            return default
        if not _is_int(value) or value < low:
            raise self.bad(f"field {name!r} must be an integer >= {low}, got {value!r}")
        return value

    def required_int(self, name: str, low: int = 0) -> int:
        value = self.int(name, low)
        if value is None:
            raise self.bad(f"field {name!r} must be an integer >= {low}, got nothing")
        return value

    def id(self, name: str, required: bool = True) -> str | None:
        value = self.get(name)
        if value is None and not required:
            return None
        if not _is_id(value):
            raise self.bad(f"field {name!r} must be a string of 1 to {MAX_ID_CHARS} characters, got {_short(value)}")
        return value

    def flag(self, name: str) -> bool:
        value = self.get(name)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise self.bad(f"field {name!r} must be true or false, got {_short(value)}")
        return value

    def blocks(self) -> tuple[int, int] | None:
        value = self.get("blocks")
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_int(v) for v in value) \
                or not 0 <= value[0] < value[1]:
            raise self.bad(f"blocks must be [start, end] with integers 0 <= start < end, got {_short(value)}")
        return value[0], value[1]

    def wait(self) -> float | None:
        value = self.get("wait")
        if value is None:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= MAX_WAIT:
            raise self.bad(f"wait must be a number of seconds in (0, {MAX_WAIT:g}], got {_short(value)}")
        return float(value)

    def push(self) -> PushTarget | None:
        value = self.get("push")
        if value is None:
            return None
        if not isinstance(value, dict) or not isinstance(value.get("peer"), str) or not _is_id(value.get("session")) \
                or not _is_id(value.get("ticket")):
            raise self.bad("relay push must be {peer: tcp://HOST:PORT, session: id, ticket: id} (ids of 1 to "
                           f"{MAX_ID_CHARS} characters), got {_short(value)}")
        try:
            peer = normalize_endpoint(value["peer"])
        except PeerUnreachable:
            raise self.bad(f"bad relay address {value['peer'][:100]!r} in relay push: expected tcp://HOST:PORT"
                           ) from None
        compress = value.get("compress")
        if compress is not None and (not isinstance(compress, str) or not 0 < len(compress) <= MAX_ID_CHARS):
            raise self.bad(f"relay push's compress must be a codec name, got {_short(compress)}")
        return PushTarget(peer, value["session"], value["ticket"], compress)

    def tensors(self, required: tuple[str, ...], optional: tuple[str, ...] = (), lora: bool = False
                ) -> dict[str, torch.Tensor]:
        tensors = self.message.tensors
        names = self.get("names")
        if names is None:
            names = list(required[:len(tensors)])
        if not isinstance(names, list) or len(names) != len(tensors) or not all(isinstance(n, str) for n in names) \
                or len(set(names)) != len(names):
            raise self.bad(f"field 'names' must name each of the {len(tensors)} tensors of the message once, got "
                           f"{_short(names)}")
        named = dict(zip(names, tensors, strict=True))
        missing = [n for n in required if n not in named]
        unknown = [n for n in named if n not in required + optional
                   and not (lora and n.startswith(LORA_PARTS) and _MODULE.fullmatch(n.split(".", 1)[1]))]
        if missing or unknown:
            raise self.bad(f"expected tensors {list(required)} (optional {list(optional)}), got {list(named)}")
        return named

    def adapter(self) -> str | None:
        value = self.get("adapter")
        if value is None:
            return None
        if not isinstance(value, str) or not _ADAPTER.fullmatch(value):
            raise self.bad(f"adapter must be a name of 1 to {MAX_ADAPTER_CHARS} characters from letters, digits, "
                           f"'.', '_', '-' and '/', got {_short(value)}")
        return value

    def lora(self, tensors: dict[str, torch.Tensor], blocks: tuple[int, int] | None) -> LoraWeights | None:
        """The client's LoRA among `tensors` (lora_a.M, lora_b.M), checked for shapes that agree."""
        named = LoraWeights.from_tensors(0.0, tensors)
        a, b = named.a, named.b
        scaling = self.get("lora_scaling")
        if not a and not b:
            if scaling is not None:
                raise self.bad("lora_scaling comes only with LoRA tensors")
            return None
        if not isinstance(scaling, (int, float)) or isinstance(scaling, bool) or not math.isfinite(scaling):
            raise self.bad(f"lora_scaling must be a finite number, got {_short(scaling)}")
        if set(a) != set(b) or len(a) > MAX_LORA_MODULES:
            raise self.bad(f"a LoRA needs lora_a.M and lora_b.M for the same layers M (at most {MAX_LORA_MODULES}), "
                           f"got {sorted(a)} and {sorted(b)}")
        count = None if blocks is None else blocks[1] - blocks[0]
        for module in a:
            ta, tb = a[module], b[module]
            ok = (ta.dim() == 3 and tb.dim() == 3 and ta.is_floating_point() and tb.is_floating_point()
                  and min(ta.shape) >= 1 and min(tb.shape) >= 1 and ta.shape[0] == tb.shape[0]
                  and tb.shape[2] == ta.shape[1] and (count is None or ta.shape[0] == count))
            if ok and count is None:
                count = ta.shape[0]
            if not ok:
                raise self.bad(f"lora_a.{module} must be [blocks, r, in] and lora_b.{module} [blocks, out, r] (one "
                               f"per block), got {_spec(ta)} and {_spec(tb)}")
        return LoraWeights(float(scaling), a, b)

    def hidden(self, tensor: torch.Tensor, name: str = "hidden") -> torch.Tensor:
        if tensor.dim() != 3 or not tensor.is_floating_point() or min(tensor.shape) < 1:
            raise self.bad(f"{name} must be a float tensor [batch, length, hidden] of sizes >= 1, got "
                           f"{_spec(tensor)}")
        return tensor

    def mask(self, tensor: torch.Tensor | None, hidden: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        expected = "[batch, length]" if hidden is None else str(list(hidden.shape[:2]))
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dim() != 2 \
                or (hidden is not None and tensor.shape != hidden.shape[:2]):
            raise self.bad(f"attention_mask must be an integer tensor {expected}, got {_spec(tensor)}")
        if ((tensor != 0) & (tensor != 1)).any():
            raise self.bad("attention_mask must hold only 0 and 1")
        return tensor

    def prompts(self, tensor: torch.Tensor | None, hidden: torch.Tensor | None,
                blocks: tuple[int, int] | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        count = "blocks" if blocks is None else str(blocks[1] - blocks[0])
        batch, length, size = ("batch", "length", "hidden") if hidden is None else hidden.shape
        shape = tensor.shape
        fits = tensor.dim() == 4 and tensor.is_floating_point() and min(shape) >= 1
        if fits and blocks is not None:
            fits = shape[0] == blocks[1] - blocks[0]
        if fits and hidden is not None:
            fits = shape[1] in (1, batch) and shape[2] <= length and shape[3] == size
        if not fits:
            raise self.bad(f"prompts must be a float tensor [{count}, 1 or {batch}, 1..{length}, {size}] (one per "
                           f"block), got {_spec(tensor)}")
        return tensor


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _spec(tensor: torch.Tensor) -> str:
    return f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}"


def _wire(kind: str, fields: Fields, **tensors: torch.Tensor | None) -> Wire:
    """(type, fields, tensors) with `names` listing the tensors present, in the order given."""
    present = {name: t for name, t in tensors.items() if t is not None}
    if tensors:
        fields = {**fields, "names": list(present)}
    return kind, fields, list(present.values())


def _optional(**fields: Any) -> Fields:
    """The fields that have a value (a field left out means its default)."""
    return {name: value for name, value in fields.items() if value is not None}


def _blocks(blocks: tuple[int, int] | None) -> list[int] | None:
    return None if blocks is None else [blocks[0], blocks[1]]


# --- requests --------------------------------------------------------------------------------------------------------


LORA_PARTS = ("lora_a.", "lora_b.")


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """A LoRA the client owns, for the blocks of one request: per linear layer M of a block, A [blocks, r, in] and
    B [blocks, out, r]; each block's layer computes y + (x A^T) B^T * scaling."""

    scaling: float
    a: dict[str, torch.Tensor] = field(default_factory=dict)
    b: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def blocks(self) -> int:
        return next(iter(self.a.values())).shape[0] if self.a else 0

    def sliced(self, start: int, end: int) -> LoraWeights:
        """The part for blocks [start, end) of the ones it holds (0-based within them)."""
        return LoraWeights(self.scaling, {m: t[start:end] for m, t in self.a.items()},
                           {m: t[start:end] for m, t in self.b.items()})

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"lora_a.{m}": t for m, t in self.a.items()}, **{f"lora_b.{m}": t for m, t in self.b.items()}}

    @classmethod
    def from_tensors(cls, scaling: float, tensors: dict[str, torch.Tensor]) -> LoraWeights:
        """The inverse of `tensors()` (names other than lora_a.M / lora_b.M are left out); shapes are not checked."""
        return cls(scaling, {n.split(".", 1)[1]: t for n, t in tensors.items() if n.startswith("lora_a.")},
                   {n.split(".", 1)[1]: t for n, t in tensors.items() if n.startswith("lora_b.")})

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.a.values(), *self.b.values()))


def _lora_fields(lora: LoraWeights | None) -> Fields:
    return {} if lora is None else {"lora_scaling": lora.scaling}


def _lora_tensors(lora: LoraWeights | None) -> dict[str, torch.Tensor]:
    return {} if lora is None else lora.tensors()


@dataclass(frozen=True)
class PushTarget:
    """Where a relayed step's output goes: the next server, its session and the ticket its request waits with."""

    peer: str  # tcp://HOST:PORT, normalized
    session: str
    ticket: str
    compress: str | None = None  # the codec the push's hidden states travel in (None: plain; see packing.py)

    def to_wire(self) -> Fields:
        return {"peer": self.peer, "session": self.session, "ticket": self.ticket,
                **_optional(compress=self.compress)}


@dataclass(frozen=True, eq=False)
class Ping:
    """A latency probe; answered with an empty result."""

    TYPE: ClassVar[str] = "ping"

    def to_wire(self) -> Wire:
        return self.TYPE, {}, []

    @classmethod
    def from_wire(cls, message: Message) -> Ping:
        _Reader(message, cls.TYPE)
        return cls()


@dataclass(frozen=True, eq=False)
class Info:
    """What a server serves and how loaded it is; answered with a map (model, span, protocol, capabilities, ...)."""

    TYPE: ClassVar[str] = "info"

    def to_wire(self) -> Wire:
        return self.TYPE, {}, []

    @classmethod
    def from_wire(cls, message: Message) -> Info:
        _Reader(message, cls.TYPE)
        return cls()


@dataclass(frozen=True, eq=False)
class Forward:
    """Blocks `blocks` (None: the server's whole span) over `hidden`, no cache. With `keep`, the server keeps the
    autograd graph for a backward and answers its id."""

    TYPE: ClassVar[str] = "forward"

    hidden: torch.Tensor
    attention_mask: torch.Tensor | None = None
    prompts: torch.Tensor | None = None
    blocks: tuple[int, int] | None = None
    keep: bool = False
    adapter: str | None = None  # a named adapter the server holds
    lora: LoraWeights | None = None  # the client's own LoRA for these blocks

    def to_wire(self) -> Wire:
        fields = _optional(blocks=_blocks(self.blocks), keep=self.keep or None, adapter=self.adapter)
        return _wire(self.TYPE, {**fields, **_lora_fields(self.lora)}, hidden=self.hidden,
                     attention_mask=self.attention_mask, prompts=self.prompts, **_lora_tensors(self.lora))

    @classmethod
    def from_wire(cls, message: Message) -> Forward:
        read = _Reader(message, cls.TYPE)
        tensors = read.tensors(("hidden",), ("attention_mask", "prompts"), lora=True)
        hidden = read.hidden(tensors["hidden"])
        blocks = read.blocks()
        return cls(hidden, read.mask(tensors.get("attention_mask"), hidden),
                   read.prompts(tensors.get("prompts"), hidden, blocks), blocks, read.flag("keep"), read.adapter(),
                   read.lora(tensors, blocks))


@dataclass(frozen=True, eq=False)
class Backward:
    """Gradients w.r.t. the input of blocks `blocks` (and w.r.t. their prompts), given the gradient of their output.
    `kept` names the graph a forward with `keep` left (the server runs the blocks again without it)."""

    TYPE: ClassVar[str] = "backward"

    hidden: torch.Tensor
    grad_output: torch.Tensor
    attention_mask: torch.Tensor | None = None
    prompts: torch.Tensor | None = None
    blocks: tuple[int, int] | None = None
    kept: str | None = None
    adapter: str | None = None
    lora: LoraWeights | None = None

    def to_wire(self) -> Wire:
        fields = _optional(blocks=_blocks(self.blocks), kept=self.kept, adapter=self.adapter)
        return _wire(self.TYPE, {**fields, **_lora_fields(self.lora)}, hidden=self.hidden,
                     grad_output=self.grad_output, attention_mask=self.attention_mask, prompts=self.prompts,
                     **_lora_tensors(self.lora))

    @classmethod
    def from_wire(cls, message: Message) -> Backward:
        read = _Reader(message, cls.TYPE)
        tensors = read.tensors(("hidden", "grad_output"), ("attention_mask", "prompts"), lora=True)
        hidden = read.hidden(tensors["hidden"])
        grad_output = read.hidden(tensors["grad_output"], "grad_output")
        if grad_output.shape != hidden.shape:
            raise read.bad(f"grad_output must have the shape of hidden {list(hidden.shape)}, got "
                           f"{list(grad_output.shape)}")
        blocks = read.blocks()
        return cls(hidden, grad_output, read.mask(tensors.get("attention_mask"), hidden),
                   read.prompts(tensors.get("prompts"), hidden, blocks), blocks, read.id("kept", required=False),
                   read.adapter(), read.lora(tensors, blocks))


@dataclass(frozen=True, eq=False)
class Open:
    """An inference session of `batch_size` sequences of up to `max_length` tokens over blocks `blocks` (None: the
    server's whole span); answered with an `OpenReply`."""

    TYPE: ClassVar[str] = "open"

    max_length: int
    batch_size: int = 1
    blocks: tuple[int, int] | None = None
    adapter: str | None = None  # every step of the session runs with this adapter
    lora: LoraWeights | None = None  # ... or with the client's own LoRA, kept by the server until the session ends

    def to_wire(self) -> Wire:
        fields = {"batch_size": self.batch_size, "max_length": self.max_length,
                  **_optional(blocks=_blocks(self.blocks), adapter=self.adapter), **_lora_fields(self.lora)}
        if self.lora is None:
            return self.TYPE, fields, []
        return _wire(self.TYPE, fields, **_lora_tensors(self.lora))

    @classmethod
    def from_wire(cls, message: Message) -> Open:
        read = _Reader(message, cls.TYPE)
        blocks = read.blocks()
        tensors = read.tensors((), (), lora=True) if message.tensors else {}
        return cls(read.required_int("max_length", 1), read.int("batch_size", 1, default=1), blocks,
                   read.adapter(), read.lora(tensors, blocks))


@dataclass(frozen=True, eq=False)
class Step:
    """New tokens through a session's blocks, appended to its cache (at `start` when given: the server first drops
    what its cache holds beyond it). A relayed step carries a `ticket` instead of `hidden`: its input is pushed by the
    previous server, waited for up to `wait` seconds (None: DEFAULT_WAIT). With `push`, the server also sends its
    output to the next server. Answered with a `StepReply`."""

    TYPE: ClassVar[str] = "step"

    session: str
    hidden: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    prompts: torch.Tensor | None = None
    start: int | None = None
    ticket: str | None = None
    wait: float | None = None
    push: PushTarget | None = None

    @property
    def relayed(self) -> bool:
        """Whether the input comes from the previous server (pushed under `ticket`) rather than in this request."""
        return self.ticket is not None

    def to_wire(self) -> Wire:
        fields = {"session": self.session, **_optional(start=self.start, ticket=self.ticket, wait=self.wait)}
        if self.push is not None:
            fields["push"] = self.push.to_wire()
        return _wire(self.TYPE, fields, hidden=self.hidden, attention_mask=self.attention_mask, prompts=self.prompts)

    @classmethod
    def from_wire(cls, message: Message) -> Step:
        read = _Reader(message, cls.TYPE)
        session = read.id("session")
        ticket = read.id("ticket", required=False)
        wait = read.wait()
        if ticket is None and wait is not None:
            raise read.bad("wait is for relayed steps only (those with a ticket)")
        required = () if ticket is not None else ("hidden",)
        tensors = read.tensors(required, ("attention_mask", "prompts"))
        hidden = None if ticket is not None else read.hidden(tensors["hidden"])
        return cls(session, hidden, read.mask(tensors.get("attention_mask"), hidden),
                   read.prompts(tensors.get("prompts"), hidden, None), read.int("start", 0), ticket, wait,
                   read.push())


@dataclass(frozen=True, eq=False)
class Push:
    """A relayed step's input, sent by the previous server to the session's request waiting with `ticket`."""

    TYPE: ClassVar[str] = "push"

    session: str
    ticket: str
    hidden: torch.Tensor

    def to_wire(self) -> Wire:
        return _wire(self.TYPE, {"session": self.session, "ticket": self.ticket}, hidden=self.hidden)

    @classmethod
    def from_wire(cls, message: Message) -> Push:
        read = _Reader(message, cls.TYPE)
        session, ticket = read.id("session"), read.id("ticket")
        return cls(session, ticket, read.hidden(read.tensors(("hidden",))["hidden"]))


@dataclass(frozen=True, eq=False)
class Cancel:
    """Drop a relayed step still waiting for its input; answered with a `CancelReply`."""

    TYPE: ClassVar[str] = "cancel"

    session: str
    ticket: str

    def to_wire(self) -> Wire:
        return self.TYPE, {"session": self.session, "ticket": self.ticket}, []

    @classmethod
    def from_wire(cls, message: Message) -> Cancel:
        read = _Reader(message, cls.TYPE)
        return cls(read.id("session"), read.id("ticket"))


@dataclass(frozen=True, eq=False)
class Close:
    """End a session and free its cache (closing an unknown session is harmless)."""

    TYPE: ClassVar[str] = "close"

    session: str

    def to_wire(self) -> Wire:
        return self.TYPE, {"session": self.session}, []

    @classmethod
    def from_wire(cls, message: Message) -> Close:
        return cls(_Reader(message, cls.TYPE).id("session"))


RequestMessage = Ping | Info | Forward | Backward | Open | Step | Push | Cancel | Close
REQUESTS: dict[str, type[RequestMessage]] = {cls.TYPE: cls for cls in (Ping, Info, Forward, Backward, Open, Step, Push,
                                                                 Cancel, Close)}


def parse_request(message: Message) -> RequestMessage:
    """The request type of `message`, validated; raises UnknownMethod for a type this version does not know and
    ProtocolError for a malformed request."""
    cls = REQUESTS.get(message.type)
    if cls is None:
        raise UnknownMethod(f"unknown request type {message.type[:40]!r}")
    return cls.from_wire(message)


# --- replies ---------------------------------------------------------------------------------------------------------
# A reply's `to_wire()` gives (fields, tensors) for `rpc.Request.reply`; `from_wire` reads a result message (error
# replies are raised by RpcClient before).


@dataclass(frozen=True, eq=False)
class OpenReply:
    session: str  # the session's id, for step and close
    cache_tokens_free: int | None = None  # what the server's cache has left after this session

    def to_wire(self) -> tuple[Fields, list[torch.Tensor]]:
        return {"session": self.session, **_optional(cache_tokens_free=self.cache_tokens_free)}, []

    @classmethod
    def from_wire(cls, message: Message) -> OpenReply:
        read = _Reader(message, RESULT)
        return cls(read.id("session"), read.int("cache_tokens_free", 0))


@dataclass(frozen=True, eq=False)
class StepReply:
    hidden: torch.Tensor  # the output of the session's blocks for the step's tokens
    position: int  # tokens the session's cache holds after the step

    def to_wire(self) -> tuple[Fields, list[torch.Tensor]]:
        _, fields, tensors = _wire(RESULT, {"position": self.position}, hidden=self.hidden)
        return fields, tensors

    @classmethod
    def from_wire(cls, message: Message) -> StepReply:
        read = _Reader(message, RESULT)
        return cls(read.hidden(read.tensors(("hidden",))["hidden"]), read.required_int("position", 0))


@dataclass(frozen=True, eq=False)
class ForwardReply:
    hidden: torch.Tensor  # the output of the blocks
    kept: str | None = None  # id of the graph kept for the backward (forward with keep, when the server kept it)

    def to_wire(self) -> tuple[Fields, list[torch.Tensor]]:
        _, fields, tensors = _wire(RESULT, _optional(kept=self.kept), hidden=self.hidden)
        return fields, tensors

    @classmethod
    def from_wire(cls, message: Message) -> ForwardReply:
        read = _Reader(message, RESULT)
        return cls(read.hidden(read.tensors(("hidden",))["hidden"]), read.id("kept", required=False))


@dataclass(frozen=True, eq=False)
class BackwardReply:
    grad_input: torch.Tensor  # gradient w.r.t. the blocks' input
    grad_prompts: torch.Tensor | None = None  # gradient w.r.t. the prompts, when the backward carried prompts
    grad_lora: dict[str, torch.Tensor] = field(default_factory=dict)  # "lora_a.M"/"lora_b.M" -> its gradient

    def to_wire(self) -> tuple[Fields, list[torch.Tensor]]:
        grads = {f"grad_{name}": t for name, t in self.grad_lora.items()}
        _, fields, tensors = _wire(RESULT, {}, grad_input=self.grad_input, grad_prompts=self.grad_prompts, **grads)
        return fields, tensors

    @classmethod
    def from_wire(cls, message: Message) -> BackwardReply:
        read = _Reader(message, RESULT)
        names = read.get("names")
        optional = ("grad_prompts", *[n for n in names if isinstance(n, str) and n.startswith(("grad_lora_a.",
                                                                                               "grad_lora_b."))
                                      and len(n) <= 80][:2 * MAX_LORA_MODULES]) \
            if isinstance(names, list) else ("grad_prompts",)
        tensors = read.tensors(("grad_input",), optional)
        grad_lora = {n.removeprefix("grad_"): t for n, t in tensors.items() if n.startswith("grad_lora_")}
        grad_prompts = tensors.get("grad_prompts")
        if grad_prompts is not None and (grad_prompts.dim() != 4 or not grad_prompts.is_floating_point()):
            raise read.bad(f"grad_prompts must be a float tensor [blocks, batch or 1, length, hidden], got "
                           f"{_spec(grad_prompts)}")
        return cls(read.hidden(tensors["grad_input"], "grad_input"), grad_prompts, grad_lora)


@dataclass(frozen=True, eq=False)
class CancelReply:
    cancelled: bool  # whether a waiting request was dropped (False: none waited with that ticket)

    def to_wire(self) -> tuple[Fields, list[torch.Tensor]]:
        return {"cancelled": self.cancelled}, []

    @classmethod
    def from_wire(cls, message: Message) -> CancelReply:
        return cls(_Reader(message, RESULT).flag("cancelled"))


__all__ = [
    "CAPABILITIES", "DEFAULT_WAIT", "MAX_ID_CHARS", "MAX_WAIT", "REQUESTS", "Backward", "BackwardReply", "Cancel",
    "CancelReply", "Close", "Forward", "ForwardReply", "Info", "LoraWeights", "Open", "OpenReply", "Ping", "Push",
    "PushTarget",
    "RequestMessage", "Step", "StepReply", "parse_capabilities", "parse_request", "require_finite", "supports",
]
