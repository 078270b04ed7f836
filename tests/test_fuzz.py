"""Property-based fuzzing (hypothesis): hostile input never crashes, hangs or grows anything without bound.

Two halves:
- ONE live in-process server on 127.0.0.1 (blocks 0:3 of the tiny llama, an adapter directory with a good and a
  broken adapter) gets thousands of hostile messages per run through a raw DEALER socket (`RpcClient.send_raw`):
  valid messages of every request type (ping, info, open, step, relayed step, push, cancel, close, forward, backward,
  gossip, with adapters and clients' LoRAs) encoded with the real codec, then mutated (header fields set to junk or
  dropped, tensor specs that disagree with their frames, truncated/extended/extra/missing frames, NaN and huge
  values, broken msgpack), plus raw garbage frames. Each message must get exactly one reply under the id its header
  carries (0 when the header is unreadable), a result or an error with a stable code other than `internal`, within
  a bounded time; relayed steps that wait for their pushed input are answered when their session closes. A
  well-behaved client keeps getting the reference output of plain transformers, and the server's counters (sessions,
  kept graphs, queue, relay mailbox, cache budget, gossip table) go back to their baseline; its RSS stays bounded.
- The parsers alone, with many more examples: the codec and request parsing, `record_from_wire` (signed and
  unsigned records), gossip merging and handling, mDNS TXT parsing, and the CLI's file inputs (datasets, PEFT
  adapters, identity key files). Each gives a result or its documented typed error, never another exception.

Every test is deterministic (`derandomize=True`, no example database); `SWARM_FUZZ_SCALE=10` runs ten times as many
examples for a deeper search than CI's. The bugs these tests found are fixed in the
library; each failing input is also kept below as a plain regression test.
"""

from __future__ import annotations

import collections
import json
import math
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarm.core.adapters import check_peft, model_linears, peft_lora_files, read_peft, read_peft_config
from swarm.core.server import Server, ServerConfig
from swarm.core.server.adapters import AdapterConfig
from swarm.core.server.handler import HandlerLimits
from swarm.core.tune.data import TuneData, load_data
from swarm.core.weights import ModelSource
from swarm.quant.compression import WireCodecs
from swarm.transport.codec import PROTOCOL_VERSION, Message, decode, decode_header, encode
from swarm.transport.errors import REMOTE_ERRORS, ConfigError, ProtocolError
from swarm.transport.gossip import GossipConfig, GossipNode, Membership
from swarm.transport.keys import KEY_ID, Identity
from swarm.transport.messages import (
    BackwardReply,
    CancelReply,
    ForwardReply,
    OpenReply,
    Step,
    StepReply,
    parse_request,
)
from swarm.transport.packing import PACKED, pack, unpack
from swarm.transport.records import (
    ServerRecord,
    normalize_endpoint,
    record_from_wire,
    record_to_wire,
    sign_record,
)
from swarm.transport.rpc import ERROR, RESULT, RpcClient, RpcClientConfig

SPAN = (0, 3)
HIDDEN = 64  # tiny_llama's hidden size
ATOL = 1e-5
BATCH_DEADLINE = 30.0  # seconds the server may take to answer one example's messages (a hang fails the test)
RSS_GROWTH = 400 << 20  # bytes the server's process may grow by over a whole fuzz run (generous: allocator caches)
# the live server's gossip thread draws from `random` while hypothesis generates examples, which hypothesis notices
pytestmark = pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")
HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture,
          HealthCheck.filter_too_much, HealthCheck.large_base_example]


SCALE = float(os.environ.get("SWARM_FUZZ_SCALE", "1"))  # more examples for a deeper run than CI's (e.g. 10)


def fuzz(examples: int) -> settings:
    return settings(derandomize=True, deadline=None, database=None, max_examples=max(1, round(examples * SCALE)),
                    suppress_health_check=HEALTH, print_blob=False)


# --- junk values -----------------------------------------------------------------------------------------------------

MSGPACK_INT = st.integers(-(1 << 63), (1 << 64) - 1)
EDGE_INTS = st.sampled_from([-(1 << 63), -1, 0, 1, 2, 3, 6, 64, 1 << 31, 1 << 62, (1 << 63) - 1, (1 << 64) - 1])
SCALARS = st.one_of(st.none(), st.booleans(), EDGE_INTS, MSGPACK_INT, st.floats(), st.text(max_size=12),
                    st.binary(max_size=12))
JUNK = st.recursive(SCALARS, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                     st.dictionaries(st.one_of(st.text(max_size=6),
                                                                               st.binary(max_size=4)), kids,
                                                                     max_size=3)),
                    max_leaves=8)
HEX = "0123456789abcdef"


LEVELS = st.sampled_from([0, 0, 1, 1, 2])  # how hostile one request is: 0 well-formed, 1 a bad field or so, 2 many


def pick(level: int, valid: st.SearchStrategy, hostile: st.SearchStrategy = JUNK) -> st.SearchStrategy:
    """`valid` for a well-formed request; for a hostile one, sometimes (level 1) or often (level 2) `hostile`."""
    return valid if level == 0 else st.one_of(*([valid] * (5 if level == 1 else 1)), hostile)


# --- tensors ----------------------------------------------------------------------------------------------------------

FLOAT_DTYPES = [torch.float32, torch.float32, torch.float32, torch.float16, torch.bfloat16, torch.float64]
ANY_DTYPES = [*FLOAT_DTYPES, torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool]


@st.composite
def tensors(draw, shape: tuple[int, ...], dtypes=FLOAT_DTYPES, special: bool = True) -> torch.Tensor:
    """A tensor of `shape` (float unless `dtypes` says otherwise), sometimes with NaN, inf or huge values."""
    dtype = draw(st.sampled_from(dtypes))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 1 << 16)))
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=gen).to(dtype)
        if special and t.numel() and draw(st.integers(0, 5)) == 0:
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf,
                                                                                  1e38, -1e30, 7e4]))
    elif dtype is torch.bool:
        t = torch.randint(0, 2, shape, generator=gen).bool()
    else:
        t = torch.randint(0, 3, shape, generator=gen).to(dtype)
    return t


@st.composite
def hidden_states(draw, level: int, batch=None) -> torch.Tensor:
    b = draw(st.integers(1, 2)) if batch is None else batch
    n = draw(st.integers(1, 6))
    size = draw(pick(level, st.just(HIDDEN), st.sampled_from([HIDDEN - 1, 1, 128])))
    shape = draw(pick(level, st.just((b, n, size)), st.sampled_from([(b, n), (n,), (b, n, size, 1), (b, 0, size),
                                                                      (0, n, size)])))
    dtypes = draw(pick(level, st.just(FLOAT_DTYPES), st.just(ANY_DTYPES)))
    return draw(tensors(shape, dtypes, special=level > 0))


@st.composite
def masks(draw, hidden: torch.Tensor) -> torch.Tensor:
    shape = tuple(hidden.shape[:2]) if hidden.dim() >= 2 else (1, 1)
    shape = draw(st.sampled_from([shape] * 6 + [(shape[0], shape[1] + 1), (shape[0],), (*shape, 1)]))
    mask = draw(tensors(shape, [torch.int64, torch.int64, torch.bool, torch.int8, torch.float32], special=False))
    if mask.numel() and not mask.is_floating_point() and mask.dtype is not torch.bool:
        mask.view(-1)[0] = 1  # a row that attends to something
        if draw(st.integers(0, 4)) == 0:
            mask.view(-1)[-1] = 2  # not 0 or 1
    return mask


@st.composite
def prompt_tensors(draw, hidden: torch.Tensor) -> torch.Tensor:
    b, n = (hidden.shape[0], hidden.shape[1]) if hidden.dim() >= 2 else (1, 1)
    blocks = draw(st.sampled_from([SPAN[1] - SPAN[0], 1, 2, 5]))
    shape = (blocks, draw(st.sampled_from([1, b, b + 1])), draw(st.integers(0, n + 1)), HIDDEN)
    return draw(tensors(draw(st.sampled_from([shape] * 5 + [shape[1:]])), FLOAT_DTYPES))


@st.composite
def lora_tensors(draw, level: int, blocks: int) -> dict[str, torch.Tensor]:
    """A client's LoRA on q_proj (64 -> 64) of `blocks` blocks, when hostile with shapes or names that do not fit."""
    rank = draw(st.integers(1, 2))
    module = draw(pick(level, st.just("self_attn.q_proj"), st.sampled_from(["self_attn.k_proj", "mlp.up_proj", "nope",
                                                                            "a..b"])))
    n = draw(pick(level, st.just(blocks), st.sampled_from([blocks + 1, 0])))
    a = draw(tensors((n, rank, draw(pick(level, st.just(HIDDEN), st.just(HIDDEN + 1)))), FLOAT_DTYPES, level > 0))
    b = draw(tensors((n, HIDDEN, draw(pick(level, st.just(rank), st.just(rank + 1)))), FLOAT_DTYPES, level > 0))
    parts = {f"lora_a.{module}": a, f"lora_b.{module}": b}
    if level and draw(st.integers(0, 6)) == 0:
        parts.pop(draw(st.sampled_from(sorted(parts))))
    return parts


# --- requests ---------------------------------------------------------------------------------------------------------


class Live:
    """What a request may name on the live server: the fuzz session of the example. Its id is written into the
    encoded frames just before they are sent: the placeholder has the length of a real id (32 hex digits), so the
    msgpack string keeps its length prefix."""

    SESSION = "live-session-placeholder-0123456"


# (valid, hostile) strategies of fields, for `pick`
IDS = (st.just(Live.SESSION), st.one_of(st.text(HEX, min_size=1, max_size=64), st.text(max_size=70), JUNK))
TICKETS = (st.sampled_from(["t1", "t2", "t3"]), st.one_of(st.text(max_size=70), JUNK))
BLOCKS = (st.one_of(st.none(), st.none(), st.just([0, 3]), st.just([1, 2])),
          st.one_of(st.just([0, 6]), st.just([2, 1]), st.lists(EDGE_INTS, max_size=3), JUNK))
ADAPTERS = (st.sampled_from([None, None, None, "good"]),
            st.one_of(st.sampled_from(["broken", "missing", "../good", "good/../../x"]), JUNK))
# relay targets: loopback ports nothing listens on (a fuzzed server must never reach out of this machine)
PEERS = (st.just("tcp://127.0.0.1:9"), st.one_of(st.sampled_from(["127.0.0.1:1", "tcp://127.0.0.1:0", "tcp://[::1]:7",
                                                                  "udp://127.0.0.1:9", "tcp://*:9"]),
                                                 st.text(max_size=30), JUNK))


def _named(fields: dict[str, Any], named: dict[str, torch.Tensor]) -> tuple[dict[str, Any], list[torch.Tensor]]:
    return {**fields, "names": list(named)}, list(named.values())


@st.composite
def compute_request(draw, kind: str) -> tuple[str, dict[str, Any], list[torch.Tensor]]:
    """forward or backward: hidden (+ grad_output) and optional mask, prompts, blocks, keep/kept, adapter, LoRA."""
    level = draw(LEVELS)
    hidden = draw(hidden_states(level))
    named: dict[str, torch.Tensor] = {"hidden": hidden}
    fields: dict[str, Any] = {}
    if kind == "backward":
        named["grad_output"] = draw(pick(level, st.just(torch.randn(hidden.shape)),
                                         st.sampled_from([hidden[..., :1].clone(), torch.zeros(3)])))
        if draw(st.booleans()):
            fields["kept"] = draw(pick(level, st.text(HEX, min_size=1, max_size=24)))
    elif draw(st.booleans()):
        fields["keep"] = draw(pick(level, st.booleans()))
    if draw(st.integers(0, 2)) == 0:
        named["attention_mask"] = draw(masks(hidden))
    if draw(st.integers(0, 4)) == 0:
        named["prompts"] = draw(prompt_tensors(hidden))
    blocks = draw(pick(level, *BLOCKS))
    if blocks is not None:
        fields["blocks"] = blocks
    adapter = draw(pick(level, *ADAPTERS))
    if adapter is not None:
        fields["adapter"] = adapter
    if draw(st.integers(0, 3)) == 0:
        count = blocks[1] - blocks[0] if isinstance(blocks, list) and len(blocks) == 2 \
            and all(isinstance(v, int) for v in blocks) and 0 < blocks[1] - blocks[0] < 8 else SPAN[1] - SPAN[0]
        named.update(draw(lora_tensors(level, count)))
        fields["lora_scaling"] = draw(pick(level, st.floats(-4, 4)))
    fields, tensors_ = _named(fields, named)
    return kind, fields, tensors_


@st.composite
def open_request(draw) -> tuple[str, dict[str, Any], list[torch.Tensor]]:
    level = draw(LEVELS)
    fields = {"max_length": draw(pick(level, st.integers(1, 64), st.one_of(EDGE_INTS, JUNK))),
              "batch_size": draw(pick(level, st.integers(1, 2), st.one_of(EDGE_INTS, JUNK)))}
    for name, strategy in (("blocks", BLOCKS), ("adapter", ADAPTERS)):
        value = draw(pick(level, *strategy))
        if value is not None:
            fields[name] = value
    if draw(st.integers(0, 3)) == 0:
        fields["lora_scaling"] = draw(pick(level, st.floats(-4, 4)))
        fields, tensors_ = _named(fields, draw(lora_tensors(level, SPAN[1] - SPAN[0])))
        return "open", fields, tensors_
    return "open", fields, []


@st.composite
def step_request(draw) -> tuple[str, dict[str, Any], list[torch.Tensor]]:
    """A step of the live session (or another id); relayed (ticket, wait, no hidden) or not; maybe with push."""
    level = draw(LEVELS)
    fields: dict[str, Any] = {"session": draw(pick(level, *IDS))}
    relayed = draw(st.integers(0, 2)) == 0
    hidden = draw(hidden_states(level, batch=draw(pick(level, st.just(1), st.just(2)))))
    named: dict[str, torch.Tensor] = {"hidden": hidden} if not relayed or (level and draw(st.booleans())) else {}
    if relayed:
        fields["ticket"] = draw(pick(level, *TICKETS))
        if draw(st.booleans()):
            fields["wait"] = draw(pick(level, st.sampled_from([0.05, 0.2, 1e-9, 600]),
                                       st.sampled_from([0, -1, 601, math.nan, math.inf])))
    if draw(st.integers(0, 3)) == 0:
        named["attention_mask"] = draw(masks(hidden))
    if draw(st.integers(0, 5)) == 0:
        named["prompts"] = draw(prompt_tensors(hidden))
    if draw(st.integers(0, 2)) == 0:
        fields["start"] = draw(pick(level, st.integers(0, 70)))
    if draw(st.integers(0, 4)) == 0:
        fields["push"] = draw(pick(level, st.fixed_dictionaries({"peer": pick(level, *PEERS),
                                                                 "session": pick(level, *IDS),
                                                                 "ticket": pick(level, *TICKETS)})))
    fields, tensors_ = _named(fields, named)
    return "step", fields, tensors_


@st.composite
def small_request(draw) -> tuple[str, dict[str, Any], list[torch.Tensor]]:
    """ping, info, push, cancel, close, or a type no server knows."""
    kind = draw(st.sampled_from(["ping", "info", "push", "push", "cancel", "close", "unknown"]))
    if kind in ("ping", "info"):
        return kind, {}, []
    if kind == "unknown":
        return draw(st.one_of(st.sampled_from(["result", "error", "gossip2", "", "Forward", "step "]),
                              st.text(max_size=50))), {}, []
    level = draw(LEVELS)
    fields = {"session": draw(pick(level, *IDS))}
    if kind == "close":
        return kind, fields, []
    fields["ticket"] = draw(pick(level, *TICKETS))
    if kind == "cancel":
        return kind, fields, []
    fields, tensors_ = _named(fields, {"hidden": draw(hidden_states(level, batch=1))})
    return kind, fields, tensors_


@st.composite
def relay_pair(draw) -> list[tuple[str, dict[str, Any], list[torch.Tensor]]]:
    """The two halves of a relayed step of the live session, in either order: the client's request (a ticket and no
    hidden) and the previous server's push of its input under the same ticket."""
    ticket = draw(st.sampled_from(["r1", "r2"]))
    hidden = draw(hidden_states(0, batch=1))
    pair = [("step", {"session": Live.SESSION, "ticket": ticket, "wait": draw(st.sampled_from([5.0, 60.0])),
                      "names": []}, []),
            ("push", {"session": Live.SESSION, "ticket": ticket, "names": ["hidden"]}, [hidden])]
    return pair if draw(st.booleans()) else pair[::-1]


CODECS = (st.sampled_from(["float16", "bfloat16", "int8"]),
          st.one_of(st.sampled_from(["none", "int4", "INT8", "float32", "", "int8 "]), JUNK))


@st.composite
def compressed(draw, request: st.SearchStrategy) -> tuple[str, dict[str, Any], list[torch.Tensor]]:
    """A request whose hidden states and gradients travel compressed (transport/packing.py), asking its reply so;
    when hostile, with parts or descriptions that do not fit: codes or scales too few or too many, NaN, infinite or
    negative scales, codes of -128, shapes that are too big or do not match, unknown codecs, parts left over."""
    kind, fields, tensors_ = draw(request)
    level = draw(LEVELS)
    codec = draw(st.sampled_from(["float16", "bfloat16", "int8"]))
    fields, tensors_ = pack(fields, tensors_, codec, WireCodecs())
    fields = {**fields, "compress": draw(pick(level, *CODECS))}
    packed = fields.get(PACKED)
    if level == 0 or not packed:
        return kind, fields, tensors_
    names = list(fields["names"])
    index = draw(st.sampled_from([i for i, n in enumerate(names) if "#" in n]))
    part = tensors_[index]
    tensors_ = list(tensors_)
    tensors_[index] = draw(st.sampled_from([
        part[:-1], torch.cat([part, part[:1]]), part.to(torch.float32), torch.full_like(part, math.nan)
        if part.is_floating_point() else torch.full_like(part, -128),
        torch.full_like(part, math.inf) if part.is_floating_point() else part, -part.float().abs() - 1,
        part * 1e38 if part.is_floating_point() else part]))
    name = names[index].split("#")[0]
    spec = dict(packed[name])
    change = draw(st.sampled_from(["shape", "codec", "dtype", "drop", "none"]))
    if change == "shape":
        spec["shape"] = draw(st.sampled_from([[1 << 40, 1 << 40], [1, 1, 1], [], [-1, 3], "x", [1, 2, 3, 4, 5, 6, 7,
                                                                                               8, 9]]))
    elif change == "codec":
        spec["codec"] = draw(CODECS[1])
    elif change == "dtype":
        spec["dtype"] = draw(st.sampled_from(["int8", "bool", "complex", None, 3]))
    fields[PACKED] = {} if change == "drop" else {**packed, name: spec}
    return kind, fields, tensors_


REQUESTS = st.one_of(compute_request("forward"), compute_request("backward"), open_request(), step_request(),
                     step_request(), small_request(), compressed(compute_request("forward")),
                     compressed(compute_request("backward")), compressed(step_request()),
                     compressed(small_request()))


# --- gossip and records ---------------------------------------------------------------------------------------------

SIGNER = Identity(bytes(range(32)))  # a fixed key: signed records are the same in every run


@st.composite
def records(draw, model: str = "llama", loopback: bool = True) -> dict[str, Any]:
    """A record's wire map: valid (unsigned with a random id, or signed by SIGNER), then maybe mutated."""
    num_blocks = draw(st.integers(1, 8))
    start = draw(st.integers(0, num_blocks - 1))
    # on loopback, mostly port 9, the relay target of the fuzzed steps: once gossip made it a known server of the
    # model, relayed steps push there (and nothing listens)
    port = draw(st.sampled_from([9, 9, 9, draw(st.integers(1, 1023))])) if loopback else draw(st.integers(1, 65535))
    host = "127.0.0.1" if loopback else draw(st.sampled_from(["127.0.0.1", "[::1]", "example.org", "10.0.0.1"]))
    record = ServerRecord(
        peer_id=draw(st.text(HEX, min_size=32, max_size=32)), model=draw(st.sampled_from([model, "other"])),
        start=start, end=draw(st.integers(start + 1, num_blocks)), num_blocks=num_blocks, hidden_size=HIDDEN,
        addresses=(f"tcp://{host}:{port}",), throughput=draw(st.floats(0, 1e6)), seq=draw(st.integers(0, 1 << 40)),
        ttl=draw(st.floats(300, 3600) if loopback else st.floats(0.5, 100)), updated_at=1.7e9,
        capabilities=("relay",), state=draw(st.sampled_from(["online", "joining", "draining", "offline"])))
    if draw(st.booleans()):
        record = sign_record(replace(record, peer_id=SIGNER.peer_id), SIGNER)
    wire = record_to_wire(record)
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from([*sorted(wire), "extra", "signature"]))
        if draw(st.integers(0, 3)) == 0:
            wire.pop(key, None)
        elif key == "addresses" and loopback:  # junk that can never be an address off this machine
            wire[key] = draw(st.one_of(st.lists(st.text(max_size=12), max_size=3), JUNK))
        elif key == "peer_id":
            wire[key] = draw(st.one_of(st.text(HEX, min_size=0, max_size=66), st.just(SIGNER.peer_id + "\n"),
                                       st.just("a" * 31 + "\n"), JUNK))
        elif key == "signature":
            wire[key] = draw(st.one_of(st.text(HEX, min_size=128, max_size=128), JUNK))
        else:
            wire[key] = draw(st.one_of(EDGE_INTS, st.floats(), JUNK, st.text(max_size=5000)))
    return wire


GOSSIP = st.one_of(
    st.builds(lambda r: ("gossip", {"records": r}, []), st.lists(records(), max_size=6)),
    st.builds(lambda r: ("gossip", {"records": r}, []), st.lists(st.one_of(records(), JUNK), max_size=6)),
    st.builds(lambda f: ("gossip", f, []), st.dictionaries(st.sampled_from(["records", "x"]), JUNK, max_size=2)),
)


# --- frames and their mutations ---------------------------------------------------------------------------------------

_SPEC_DTYPES = ["float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool",
                "complex64", "float8", "", "FLOAT32"]


@st.composite
def mutated_frames(draw, request: tuple[str, dict[str, Any], list[torch.Tensor]], request_id: int) -> list[bytes]:
    """The request's frames as the codec writes them, then maybe mutated at the header, spec or frame level."""
    kind, fields, tensors_ = request
    frames = [bytes(f) for f in encode(kind, request_id, fields, tensors_)]
    how = draw(st.sampled_from(["none"] * 7 + ["header", "header", "spec", "spec", "frame", "count", "bytes"]))
    if how in ("header", "spec"):
        header = msgpack.unpackb(frames[0], raw=False)
        if how == "header":
            for _ in range(draw(st.integers(1, 3))):
                key = draw(st.sampled_from(["v", "type", "id", "tensors", "names", *sorted(fields), "extra",
                                            b"names", b"type"]))
                if draw(st.integers(0, 3)) == 0:
                    header.pop(key, None)
                elif key == "id":  # never a valid id: replies to valid ids must stay unique to tell them apart
                    header[key] = draw(st.one_of(st.sampled_from([-1, 1 << 63, (1 << 64) - 1, True, 1.0, "1"]),
                                                 st.none()))
                elif key == "v":
                    header[key] = draw(st.one_of(st.sampled_from([0, 2, PROTOCOL_VERSION + 1, True, "1"]), JUNK))
                else:
                    header[key] = draw(JUNK)
        elif header["tensors"]:
            specs = header["tensors"]
            i = draw(st.integers(0, len(specs) - 1))
            change = draw(st.sampled_from(["dtype", "dim", "rank", "junk"]))
            if change == "dtype":
                specs[i][0] = draw(st.sampled_from(_SPEC_DTYPES))
            elif change == "dim" and specs[i][1]:
                d = draw(st.integers(0, len(specs[i][1]) - 1))
                specs[i][1][d] = draw(st.sampled_from([0, 1, specs[i][1][d] + 1, specs[i][1][d] * 2, -1, 1 << 40,
                                                       (1 << 64) - 1, 2 ** 39]))
            elif change == "rank":
                specs[i][1] = draw(st.lists(st.sampled_from([0, 1, 2, 64, 1 << 33]), max_size=10))
            else:
                specs[i] = draw(JUNK)
        frames[0] = msgpack.packb(header, use_bin_type=True)
    elif how == "frame" and len(frames) > 1:
        i = draw(st.integers(1, len(frames) - 1))
        cut = draw(st.sampled_from(["truncate", "extend", "empty", "garbage"]))
        if cut == "truncate":
            frames[i] = frames[i][:draw(st.integers(0, max(0, len(frames[i]) - 1)))]
        elif cut == "extend":
            frames[i] = frames[i] + draw(st.binary(min_size=1, max_size=9))
        elif cut == "empty":
            frames[i] = b""
        else:
            frames[i] = draw(st.binary(max_size=64))
    elif how == "count":
        if len(frames) > 1 and draw(st.booleans()):
            del frames[draw(st.integers(1, len(frames) - 1))]
        else:
            frames.extend(draw(st.lists(st.binary(max_size=32), min_size=1, max_size=3)))
    elif how == "bytes":
        raw = frames[0]
        change = draw(st.sampled_from(["truncate", "flip", "prefix", "suffix"]))
        if change == "truncate":
            frames[0] = raw[:draw(st.integers(0, len(raw) - 1))]
        elif change == "flip":
            i = draw(st.integers(0, len(raw) - 1))
            frames[0] = raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:]
        elif change == "prefix":
            frames[0] = draw(st.binary(min_size=1, max_size=8)) + raw
        else:
            frames[0] = raw + draw(st.binary(min_size=1, max_size=8))
    return frames


RAW_GARBAGE = st.one_of(
    st.lists(st.binary(max_size=64), min_size=1, max_size=4),
    st.builds(lambda b: [b"\xc1" + b], st.binary(max_size=32)),  # 0xc1 is never valid msgpack
    st.builds(lambda v: [msgpack.packb(v, use_bin_type=True)], JUNK),  # valid msgpack, not a header
    st.builds(lambda d: [msgpack.packb(d, use_bin_type=True)],  # a map with some of the header's keys
              st.dictionaries(st.sampled_from(["v", "type", "id", "tensors", "names"]), JUNK, max_size=5)),
    st.builds(lambda n: [b"\x91" * n + b"\x90"], st.integers(1, 200_000)),  # arrays nested very deeply
    st.just([msgpack.packb({"v": PROTOCOL_VERSION, "type": "ping", "id": 5, "pad": "x" * (1 << 20)})]),  # > 1 MiB
    st.just([msgpack.packb({"v": PROTOCOL_VERSION, "type": "forward", "id": 6, "tensors": [["int8", [1]]] * 65}),
             *[b"\x00"] * 65]),  # more tensors than a message may carry
    st.just([msgpack.packb({"v": PROTOCOL_VERSION, "type": "forward", "id": 7, "names": ["hidden"],
                            "tensors": [["float32", [1, 1 << 20, 64]]]}), b"\x00" * 64]),  # a frame far too short
)


def expected_reply_id(frames: list[bytes]) -> int:
    """The id a server answers these frames under: the header's when it reads, else 0 (the codec's rule)."""
    try:
        return decode_header(frames[0])["id"]
    except ProtocolError:
        return 0


def parsed(frames: list[bytes]) -> Any:
    """The request these frames carry, as the server parses it, or None when they are refused before that."""
    try:
        message = decode(frames)
        return parse_request(message) if message.type != "gossip" else message
    except ProtocolError:
        return None


# --- the live server --------------------------------------------------------------------------------------------------


class Sample:
    """Embeddings of two token sequences and the reference output of blocks 0:3, computed by plain transformers."""

    def __init__(self, ref):
        gen = torch.Generator().manual_seed(11)
        ids = torch.randint(0, ref.config.vocab_size, (2, 6), generator=gen)
        with torch.no_grad():
            states = ref(ids, output_hidden_states=True).hidden_states
        self.hidden = states[0].detach().clone()
        self.expected = states[SPAN[1]].detach().clone()


def rss_bytes(pid: int | None = None) -> int:
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Fuzzer:
    """A live server, a hostile raw socket, a hostile RPC client (to open and close the fuzz sessions) and a
    well-behaved client; `exchange` sends messages and checks their replies."""

    def __init__(self, server: Server, sample: Sample):
        self.server, self.sample = server, sample
        self.raw = RpcClient(server.endpoint, RpcClientConfig(timeout=BATCH_DEADLINE))
        self.rpc = RpcClient(server.endpoint, RpcClientConfig(timeout=BATCH_DEADLINE))
        self.good = RpcClient(server.endpoint, RpcClientConfig(timeout=BATCH_DEADLINE))
        self.next_id = 1 << 40  # far from any id a mutation writes
        self.sent = 0
        self.codes: collections.Counter[tuple[str, str]] = collections.Counter()  # (request type, reply code)

    def close(self) -> None:
        for client in (self.raw, self.rpc, self.good):
            client.close()

    def counters(self) -> dict[str, Any]:
        info = self.good.call("info").fields
        handler = self.server.handler
        return {"sessions": info["sessions"], "kept_graphs": info["kept_graphs"], "kept_bytes": info["kept_bytes"],
                "queue": info["queue"], "queued_bytes": info["queued_bytes"],
                "cache_tokens_free": info["cache_tokens_free"], "mailbox": len(handler.mailbox),
                "adapter_users": sum(a["sessions"] for a in info["adapter_memory"]["loaded"])}

    def settled(self, baseline: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """The counters once they are back at `baseline` (kept graphs expire after kept_ttl), or as they are after
        `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            now = self.counters()
            if now == baseline or time.monotonic() > deadline:
                return now
            time.sleep(0.05)

    def check_serving(self) -> None:
        """The well-behaved client: a forward and a session of two steps give plain transformers' output."""
        sample = self.sample
        out = self.good.call("forward", {"names": ["hidden"]}, [sample.hidden]).tensors[0]
        torch.testing.assert_close(out, sample.expected, atol=ATOL, rtol=0)
        session = self.good.call("open", {"batch_size": 2, "max_length": 6}).fields["session"]
        try:
            outs = [self.good.call("step", {"session": session, "names": ["hidden"]}, [part]).tensors[0]
                    for part in (sample.hidden[:, :4], sample.hidden[:, 4:])]
        finally:
            self.good.call("close", {"session": session})
        torch.testing.assert_close(torch.cat(outs, dim=1), sample.expected, atol=ATOL, rtol=0)

    def exchange(self, requests: list[list[bytes]]) -> None:
        """Send the requests (their frames) with a fuzz session of their own opened for them; every one must be
        answered once, under the id its header carries, with a result or a typed error other than `internal`,
        within BATCH_DEADLINE (relayed steps of the fuzz session: by the time its close is answered). A late or
        doubled reply fails here or at the next exchange (no request is owed it)."""
        session = self.rpc.call("open", {"batch_size": 1, "max_length": 64}).fields["session"]
        outstanding: collections.Counter[int] = collections.Counter()
        waiting: collections.Counter[int] = collections.Counter()  # relayed steps: answered by the close at the end
        kinds: dict[int, str] = {}  # what each request is, as the server parses it
        for frames in requests:
            assert len(session) == len(Live.SESSION)
            frames = [f.replace(Live.SESSION.encode(), session.encode()) for f in frames]
            rid = expected_reply_id(frames)
            request = parsed(frames)
            if isinstance(request, Step) and request.relayed and request.session == session:
                waiting[rid] += 1
            else:
                outstanding[rid] += 1
            kinds[rid] = getattr(request, "TYPE", None) or getattr(request, "type", None) or "unparsed"
            if isinstance(request, Step) and request.relayed:
                kinds[rid] = "relayed step"
            self.raw.send_raw(frames)
            self.sent += 1
        deadline = time.monotonic() + BATCH_DEADLINE
        closed = False
        while +outstanding or +waiting:
            if not +outstanding and not closed:
                self.rpc.call("close", {"session": session})  # answers the relayed steps still waiting
                closed = True
            left = deadline - time.monotonic()
            assert left > 0, f"no reply within {BATCH_DEADLINE} s to ids {sorted(+outstanding)} (waiting: " \
                             f"{sorted(+waiting)})"
            frames = self.raw.recv_raw(timeout=min(left, 1.0))
            if frames is None:
                continue
            reply = decode(frames)
            assert reply.type in (RESULT, ERROR), reply
            if reply.type == ERROR:
                code = reply.get("code")
                assert code in REMOTE_ERRORS and code != "internal", (code, reply.get("message"))
                self.codes[kinds.get(reply.id, "?"), code] += 1
            else:
                self.codes[kinds.get(reply.id, "?"), "result"] += 1
                if kinds.get(reply.id) == "open" and isinstance(reply.get("session"), str):
                    self.rpc.call("close", {"session": reply.get("session")})  # a hostile open that worked
            pool = outstanding if outstanding[reply.id] else waiting
            assert pool[reply.id] > 0, f"a reply under id {reply.id} that no request is owed"
            pool[reply.id] -= 1
        if not closed:
            self.rpc.call("close", {"session": session})


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama, tmp_path_factory) -> Path:
    """An adapter directory with a LoRA that fits (good) and one whose weights file is junk (broken)."""
    root = tmp_path_factory.mktemp("adapters")
    source = ModelSource(str(tiny_llama))
    family, config = source.family(), source.config("float32")
    weights = {(block, "self_attn.q_proj"): (torch.randn(2, HIDDEN) * 0.1, torch.randn(HIDDEN, 2) * 0.1)
               for block in range(6)}
    for name in ("good", "broken"):
        peft_lora_files(root / name, weights, family, config, rank=2, alpha=4.0, targets=["q_proj"],
                        base_model=str(tiny_llama))
    weights_file = root / "broken" / "adapter_model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:200])
    return root


@pytest.fixture(scope="module")
def fuzzer(tiny_llama, tiny_llama_ref, adapter_dir):
    limits = HandlerLimits(kept_ttl=0.3, max_kept=4)
    server = Server(ServerConfig(str(tiny_llama), SPAN, host="127.0.0.1", port=0, limits=limits, poll_ms=20,
                                 adapters=AdapterConfig(directory=str(adapter_dir)))).start()
    fuzzer = Fuzzer(server, Sample(tiny_llama_ref))
    try:
        fuzzer.check_serving()
        yield fuzzer
    finally:
        fuzzer.close()
        server.stop()


@pytest.fixture(scope="module")
def baseline(fuzzer) -> dict[str, Any]:
    """The server's counters when idle, and its RSS after a warm-up of each kind of work (no hostile message yet)."""
    h = torch.zeros(1, 2, HIDDEN)
    warm_up = [("forward", {"names": ["hidden"], "keep": True}, [h]), ("forward", {"names": ["hidden"],
                                                                                   "adapter": "good"}, [h]),
               ("backward", {"names": ["hidden", "grad_output"]}, [h, h]),
               ("step", {"session": Live.SESSION, "names": ["hidden"]}, [h])]
    fuzzer.exchange([[bytes(f) for f in encode(kind, i + 1, fields, t)] for i, (kind, fields, t) in
                     enumerate(warm_up)])
    idle = {"sessions": 0, "kept_graphs": 0, "kept_bytes": 0, "queue": 0, "queued_bytes": 0,
            "cache_tokens_free": fuzzer.server.handler.budget.total, "mailbox": 0, "adapter_users": 0}
    assert fuzzer.settled(idle) == idle
    return {"counters": idle, "rss": rss_bytes()}


def assert_back_to_baseline(fuzzer: Fuzzer, baseline: dict[str, Any]) -> None:
    fuzzer.check_serving()
    assert fuzzer.settled(baseline["counters"]) == baseline["counters"]
    assert len(fuzzer.server.discovery.membership) <= fuzzer.server.discovery.membership.config.max_records + 1
    assert rss_bytes() - baseline["rss"] < RSS_GROWTH


# --- the live server under fuzzing ------------------------------------------------------------------------------------


@st.composite
def gossip_batches(draw) -> list[list[bytes]]:
    return [draw(mutated_frames(draw(GOSSIP), i)) for i in range(draw(st.integers(1, 4)))]


@fuzz(80)
@given(batch=gossip_batches())
def test_live_server_answers_hostile_gossip(fuzzer, baseline, batch) -> None:
    """(First: the records it learns make 127.0.0.1:9 a server of its model, so relayed steps below push there.)"""
    ids = iter(range(fuzzer.next_id, fuzzer.next_id + 100))
    fuzzer.next_id += 100
    fuzzer.exchange([_renumber(frames, next(ids)) for frames in batch])


@st.composite
def request_batches(draw) -> list[list[bytes]]:
    requests = [draw(REQUESTS) for _ in range(draw(st.integers(1, 8)))]
    if draw(st.integers(0, 4)) == 0:
        requests[draw(st.integers(0, len(requests))):0] = draw(relay_pair())
    return [draw(mutated_frames(request, i)) for i, request in enumerate(requests)]


@pytest.mark.slow
@fuzz(350)
@given(batch=request_batches())
def test_live_server_answers_every_hostile_request(fuzzer, baseline, batch) -> None:
    ids = iter(range(fuzzer.next_id, fuzzer.next_id + 100))
    fuzzer.next_id += 100
    fuzzer.exchange([_renumber(frames, next(ids)) for frames in batch])
    if fuzzer.sent % 97 < 8:  # now and then, mid-run: the well-behaved client is served right
        fuzzer.check_serving()


def _renumber(frames: list[bytes], request_id: int) -> list[bytes]:
    """The frames with the header's small test id replaced by a unique one (kept when a mutation broke it)."""
    try:
        header = msgpack.unpackb(frames[0], raw=False)
    except Exception:
        return frames
    if isinstance(header, dict) and isinstance(header.get("id"), int) and not isinstance(header["id"], bool) \
            and 0 <= header["id"] < 100:
        header["id"] = request_id
        return [msgpack.packb(header, use_bin_type=True), *frames[1:]]
    return frames


@fuzz(150)
@given(batch=st.lists(RAW_GARBAGE, min_size=1, max_size=8))
def test_live_server_answers_raw_garbage(fuzzer, baseline, batch) -> None:
    fuzzer.exchange(batch)


def test_live_server_after_fuzzing_serves_right_and_holds_nothing(fuzzer, baseline) -> None:
    """Runs after the fuzz tests above (file order): thousands of messages, then counters at their baseline."""
    assert fuzzer.sent >= 1000, fuzzer.sent  # the whole file sent thousands (this checks the run was not cut short)
    assert_back_to_baseline(fuzzer, baseline)
    answered = {kind for kind, code in fuzzer.codes if code == "result"}
    assert answered >= {"ping", "info", "open", "forward", "backward", "step", "relayed step", "push", "cancel",
                        "close", "gossip"}, fuzzer.codes


# --- the parsers alone ------------------------------------------------------------------------------------------------


@st.composite
def any_frames(draw) -> list[bytes]:
    if draw(st.integers(0, 3)) == 0:
        return draw(RAW_GARBAGE)
    return draw(mutated_frames(draw(st.one_of(REQUESTS, GOSSIP)), draw(st.integers(0, 1 << 20))))


@fuzz(800)
@given(frames=any_frames())
def test_codec_and_request_parsing_refuse_with_protocol_errors_only(frames) -> None:
    try:
        message = decode(frames)
    except ProtocolError:
        return
    assert isinstance(message, Message) and len(message.tensors) == len(frames) - 1
    header = decode_header(frames[0])
    for (dtype, shape), tensor, frame in zip(header.get("tensors", []), message.tensors, frames[1:], strict=True):
        assert str(tensor.dtype) == f"torch.{dtype}" and list(tensor.shape) == shape and tensor.nbytes == len(frame)
    if message.type == "gossip":
        return
    try:
        request = parse_request(unpack(message, WireCodecs()))  # compressed tensors decoded first, as servers do
    except ProtocolError:  # UnknownMethod included
        return
    assert request.TYPE == message.type


REPLIES = [OpenReply, StepReply, ForwardReply, BackwardReply, CancelReply]


@st.composite
def reply_frames(draw) -> list[bytes]:
    """A server's reply as it would send it (of any reply type), then maybe mutated: what a client parses."""
    h = draw(hidden_states(draw(LEVELS)))
    reply = draw(st.sampled_from([
        OpenReply("a" * 32, 10), StepReply(h, 3), ForwardReply(h, "k1"), ForwardReply(h),
        BackwardReply(h, torch.randn(3, 1, 2, HIDDEN), {"lora_a.q": torch.randn(3, 2, HIDDEN)}), BackwardReply(h),
        CancelReply(True)]))
    fields, tensors_ = reply.to_wire()
    if draw(st.booleans()):  # compressed, as a server asked so answers
        fields, tensors_ = pack(fields, tensors_, draw(st.sampled_from(["float16", "bfloat16", "int8"])),
                                WireCodecs())
    for _ in range(draw(st.integers(0, 2))):
        fields[draw(st.sampled_from(["session", "position", "kept", "names", "cancelled", "cache_tokens_free"]))] = \
            draw(JUNK)
    return draw(mutated_frames((RESULT, fields, tensors_), draw(st.integers(0, 1 << 20))))


@fuzz(400)
@given(frames=reply_frames())
def test_reply_parsing_refuses_with_protocol_errors_only(frames) -> None:
    """What a client reads from a hostile server: each reply type gives its reply or a ProtocolError."""
    try:
        message = decode(frames)
    except ProtocolError:
        return
    try:
        message = unpack(message, WireCodecs())  # what a client does first (peers.py)
    except ProtocolError:
        return
    for cls in REPLIES:
        try:
            reply = cls.from_wire(message)
        except ProtocolError:
            continue
        assert isinstance(reply, cls)


@fuzz(400)
@given(wire=records(loopback=False))
def test_record_from_wire_gives_a_record_or_a_protocol_error(wire) -> None:
    try:
        record = record_from_wire(wire)
    except ProtocolError:
        return
    assert isinstance(record, ServerRecord)
    assert all(c in HEX for c in record.peer_id) and 8 <= len(record.peer_id) <= 64
    assert 0 <= record.start < record.end <= record.num_blocks
    assert record.addresses and all(normalize_endpoint(a) == a for a in record.addresses)
    assert 0 < record.ttl <= 86400 and math.isfinite(record.throughput) and record.seq >= 0
    if KEY_ID.fullmatch(record.peer_id):  # a key's record stands only with that key's signature over every field
        assert record.signed and record.peer_id == SIGNER.peer_id
        assert record == record_from_wire(record_to_wire(sign_record(record, SIGNER)))
    else:
        assert not record.signed
    assert record_from_wire(record_to_wire(record)) == record


@fuzz(80)
@given(batches=st.lists(st.one_of(st.lists(st.one_of(records(loopback=False), JUNK), max_size=8), JUNK),
                        min_size=1, max_size=3))
def test_gossip_merge_and_handle_never_raise_and_stay_bounded(batches) -> None:
    clock = [0.0]
    membership = Membership(GossipConfig(max_records=6), clock=lambda: clock[0])
    node = GossipNode(membership)
    try:
        for batch in batches:
            clock[0] += 1.0
            try:
                answer = node.handle({"records": batch})
            except ProtocolError:  # not a list, or a longer one than the table holds
                assert not isinstance(batch, list) or len(batch) > 6
                continue
            assert isinstance(answer, dict) and isinstance(answer["records"], list)
            assert len(membership) <= 6
            for wire in answer["records"]:  # what we pass on is what a peer would take
                assert isinstance(record_from_wire(wire), ServerRecord)
            membership.merge(batch if isinstance(batch, list) else [batch])
            membership.expire()
    finally:
        node.stop()


TAG = "0123456789abcdef01234567"  # a private swarm's mDNS tag
TXT_KEYS = st.sampled_from([b"id", b"proto", b"model", b"swarm", b"ID", b"", b"id\x00", b"x" * 300])
TXT_VALUES = st.one_of(st.none(), st.binary(max_size=80), st.text(HEX, min_size=0, max_size=70).map(str.encode),
                       st.just(b"\xff\xfe"), st.just(SIGNER.peer_id.encode()), st.just(TAG.encode()))


@fuzz(200)
@given(txt=st.one_of(st.dictionaries(TXT_KEYS, TXT_VALUES, max_size=5), st.binary(max_size=300)),
       port=st.integers(0, 70000), addresses=st.lists(st.sampled_from(["127.0.0.1", "10.1.2.3", "::1"]), max_size=3),
       tag=st.sampled_from([None, TAG]))
def test_mdns_service_parsing_gives_a_peer_or_nothing(txt, port, addresses, tag) -> None:
    import ipaddress

    from zeroconf import ServiceInfo

    from swarm.transport.mdns import SERVICE_TYPE, MdnsPeer, _peer_from_info

    try:
        info = ServiceInfo(SERVICE_TYPE, f"fuzz.{SERVICE_TYPE}", port=min(port, 65535),
                           properties=txt, addresses=[ipaddress.ip_address(a).packed for a in addresses])
    except Exception:  # zeroconf itself refuses to build it: nothing to parse
        return
    if port > 65535:
        info.port = port
    peer = _peer_from_info(info, tag)
    if peer is not None:
        assert isinstance(peer, MdnsPeer) and 8 <= len(peer.peer_id) <= 64 and all(c in HEX for c in peer.peer_id)
        assert peer.endpoints and all(normalize_endpoint(e) == e for e in peer.endpoints)
        assert (info.properties.get(b"swarm") == TAG.encode()) == (tag is not None)  # never another swarm's peer


# --- the command line's file inputs -----------------------------------------------------------------------------------

ROW_VALUES = st.one_of(st.text(max_size=20), st.integers(-3, 5), EDGE_INTS, st.floats(), st.booleans(), st.none(),
                       st.lists(st.integers(), max_size=2), st.just("x" * 200_000))


@st.composite
def dataset_files(draw) -> tuple[str, bytes]:
    """A dataset file (suffix, content): rows of text and label, some junk, some huge or nested deeply."""
    suffix = draw(st.sampled_from([".jsonl", ".json", ".csv", ".tsv"]))
    rows = draw(st.lists(st.fixed_dictionaries({"text": ROW_VALUES, "label": ROW_VALUES}), max_size=6))
    if suffix in (".csv", ".tsv"):
        sep = "," if suffix == ".csv" else "\t"
        lines = [f"text{sep}label"] + [f"{r['text']}{sep}{r['label']}" for r in rows]
    elif suffix == ".json" and draw(st.booleans()):
        lines = [json.dumps(rows)]
    else:
        lines = [json.dumps(r) for r in rows]
    for _ in range(draw(st.integers(0, 2))):  # junk lines
        junk = draw(st.one_of(st.text(max_size=40), st.just("[" * 50_000), st.just('{"text": "a", "label": 1'
                                                                                    + "0" * 5000 + "}"),
                              st.just('"quoted, with ""quotes"" and\nbreaks'), st.just("\x00\x00")))
        lines.insert(draw(st.integers(0, len(lines))), junk)
    content = "\n".join(lines).encode()
    if draw(st.integers(0, 9)) == 0:
        content = draw(st.sampled_from([b"\xff\xfe\x00junk", b"\xef\xbb\xbf", b"", content[:len(content) // 2]]))
    return suffix, content


@fuzz(250)
@given(case=dataset_files(), task=st.sampled_from(["classification", "lm"]))
def test_dataset_files_give_data_or_a_config_error(case, task) -> None:
    suffix, content = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(content)
        try:
            data = load_data(str(path), task=task)
        except ConfigError:
            return
    assert isinstance(data, TuneData) and data.train
    if task == "classification":
        assert all(0 <= e.label < data.num_labels for e in [*data.train, *data.validation])


@pytest.fixture(scope="module")
def peft_template(tiny_llama, tmp_path_factory) -> dict[str, Any]:
    """A valid LoRA adapter for tiny_llama (its config and weights file), and what read_peft needs of the model."""
    source = ModelSource(str(tiny_llama))
    family, config = source.family(), source.config("float32")
    weights = {(block, module): (torch.randn(2, 64) * 0.1, torch.randn(64 if module == "self_attn.q_proj" else 32, 2))
               for block in range(6) for module in ("self_attn.q_proj", "self_attn.v_proj")}
    directory = peft_lora_files(tmp_path_factory.mktemp("peft") / "good", weights, family, config, rank=2, alpha=4,
                                targets=["q_proj", "v_proj"], base_model="tiny")
    return {"config": json.loads((directory / "adapter_config.json").read_text()),
            "weights": (directory / "adapter_model.safetensors").read_bytes(), "family": family,
            "model_config": config, "linears": lambda i: model_linears(family, config, i)}


JSON_JUNK = st.recursive(st.one_of(st.none(), st.booleans(), EDGE_INTS, st.floats(allow_nan=False),
                                   st.text(max_size=12)),
                         lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                st.dictionaries(st.text(max_size=6), kids, max_size=3)), max_leaves=6)
CONFIG_VALUES = st.one_of(JSON_JUNK, st.sampled_from(["([", "(?i)q_proj", ".*", "all-linear", "LORA", "IA3", "lora"]),
                          st.lists(st.sampled_from(["q_proj", "v_proj", "lm_head", "(["]), max_size=3),
                          st.dictionaries(st.sampled_from(["q_proj", "([", "(?i)x"]), st.integers(-1, 4), max_size=2))
CONFIG_KEYS = st.sampled_from(["peft_type", "r", "lora_alpha", "target_modules", "exclude_modules", "modules_to_save",
                               "rank_pattern", "alpha_pattern", "layers_to_transform", "feedforward_modules",
                               "use_rslora", "bias", "fan_in_fan_out", "use_dora"])


@st.composite
def adapter_files(draw, template: dict[str, Any]) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) of the template, either or both damaged."""
    config = dict(template["config"])
    for _ in range(draw(st.integers(0, 3))):
        key = draw(CONFIG_KEYS)
        if draw(st.integers(0, 3)) == 0:
            config.pop(key, None)
        else:
            config[key] = draw(CONFIG_VALUES)
    config_bytes = json.dumps(config).encode()
    if draw(st.integers(0, 9)) == 0:
        config_bytes = draw(st.sampled_from([b"[" * 100_000, b"\xff", b"[]", b"", config_bytes[:-3]]))
    weights = template["weights"]
    damage = draw(st.sampled_from(["none", "none", "truncate", "flip", "header", "garbage"]))
    if damage == "truncate":
        weights = weights[:draw(st.integers(0, len(weights) - 1))]
    elif damage == "flip":
        i = draw(st.integers(0, min(len(weights) - 1, 2000)))  # mostly the header: its JSON and its length
        weights = weights[:i] + bytes([weights[i] ^ draw(st.integers(1, 255))]) + weights[i + 1:]
    elif damage == "header":
        header = json.dumps(draw(st.dictionaries(st.text(max_size=70), JSON_JUNK, max_size=3))).encode()
        weights = len(header).to_bytes(8, "little") + header + weights[-64:]
    elif damage == "garbage":
        weights = draw(st.binary(max_size=64))
    return config_bytes, weights


@fuzz(120)
@given(data=st.data())
def test_adapter_files_give_an_adapter_or_a_config_error(peft_template, data) -> None:
    config_bytes, weights = data.draw(adapter_files(peft_template))
    t = peft_template
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "adapter"
        directory.mkdir()
        (directory / "adapter_config.json").write_bytes(config_bytes)
        (directory / "adapter_model.safetensors").write_bytes(weights)
        try:
            read_peft_config(directory / "adapter_config.json")
            check_peft(str(directory))
            task = read_peft(str(directory), t["family"], t["model_config"], 0, 6, t["linears"], torch.float32,
                             max_bytes=1 << 20)
        except ConfigError:
            return
    assert task.nbytes <= 1 << 20


@fuzz(150)
@given(content=st.one_of(
    st.binary(max_size=200),
    st.builds(lambda seed, tail: f"swarm-identity-v1:{seed}{tail}".encode(), st.text(HEX, max_size=70),
              st.sampled_from(["", "\n", "\n\n", " ", "\x00", ":00", "\r\n"])),
    st.builds(lambda head, seed: f"{head}:{bytes(seed).hex()}\n".encode(), st.sampled_from(
        ["swarm-identity-v1", "swarm-identity-v2", "SWARM-IDENTITY-V1", ""]), st.binary(min_size=32, max_size=32)),
))
def test_identity_files_give_an_identity_or_a_config_error(content) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "identity.key"
        path.write_bytes(content)
        os.chmod(path, 0o600)
        try:
            identity = Identity.load_or_create(path)
        except ConfigError:
            assert path.read_bytes() == content  # a file it cannot read is left as it was
            return
    assert KEY_ID.fullmatch(identity.peer_id)
    from swarm.transport.keys import verify

    assert verify(identity.peer_id, b"data", identity.sign(b"data"))


def _fixed_swarm_key_text() -> str:
    import zmq
    from zmq.utils import z85

    secret = z85.encode(bytes(range(1, 33)))
    public = zmq.curve_public(secret).decode()
    return (f"swarm-key-v1\n# a swarm key\npublic = {public}\nsecret = {secret.decode()}\nswarm = {public}\n")


SWARM_KEY_TEXT = _fixed_swarm_key_text()  # fixed, so the examples are the same in every run
Z85_JUNK = st.one_of(st.text("0123456789abcdefABCDEF.-:+=^!/*?&<>()[]{}@%$#", min_size=38, max_size=42),
                     st.just("#" * 40), st.just("%" * 40), st.text(max_size=45))


@st.composite
def swarm_key_files(draw) -> bytes:
    lines = SWARM_KEY_TEXT.splitlines()
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        change = draw(st.sampled_from(["value", "drop", "junk", "dup"]))
        if change == "value" and "=" in lines[i]:
            lines[i] = lines[i].split("=")[0] + "= " + draw(Z85_JUNK)
        elif change == "drop":
            del lines[i]
        elif change == "junk":
            lines[i] = draw(st.text(max_size=60))
        else:
            lines.insert(i, lines[i])
        if not lines:
            break
    content = "\n".join(lines).encode()
    if draw(st.integers(0, 9)) == 0:
        content = draw(st.sampled_from([b"\xff\xfe", b"", b"x" * (70 << 10), content[:len(content) // 2]]))
    return content


@fuzz(200)
@given(files=st.lists(swarm_key_files(), min_size=1, max_size=3))
def test_swarm_key_files_give_a_key_or_a_config_error(files) -> None:
    import zmq

    from swarm.transport.keys import Z85_KEY, SwarmKey, allowed_keys

    with tempfile.TemporaryDirectory() as tmp:
        for i, content in enumerate(files):
            path = Path(tmp) / f"key{i}"
            path.write_bytes(content)
            os.chmod(path, 0o600)
            try:
                key = SwarmKey.load(path)
            except ConfigError:
                continue
            assert zmq.curve_public(key.secret) == key.public
        keys = allowed_keys(tmp)  # a directory of junk: the keys it can read, never an error
    assert all(Z85_KEY.fullmatch(k.decode()) for k in keys)


# --- what the fuzzing found, kept as plain regression tests ---------------------------------------------------------


@pytest.mark.parametrize("name, content", [
    ("nested.jsonl", "[" * 100_000 + "\n"),  # RecursionError
    ("nested.json", "[" * 100_000),  # RecursionError
    ("long_int.jsonl", '{"text": "a", "label": 1' + "0" * 5000 + '}\n{"text": "b", "label": 0}\n'),  # ValueError
    ("long_field.csv", "text,label\n" + "x" * 200_000 + ",1\nb,0\n"),  # _csv.Error
    ("huge_label.jsonl", '{"text": "a", "label": 99999999999999999999}\n{"text": "b", "label": 0}\n'),  # took all RAM
    ("huge_label.csv", "text,label\na,1000000000\nb,0\n"),  # the same, through a CSV file's integer literals
])
def test_junk_dataset_files_are_config_errors(tmp_path, name, content) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_data(str(path))
    assert name in str(info.value)


def test_a_csv_label_of_5000_digits_is_a_string_label(tmp_path) -> None:
    path = tmp_path / "long_label.csv"
    path.write_text("text,label\na," + "9" * 5000 + "\nb,0\n")  # int() refused it with a ValueError
    assert sorted(load_data(str(path)).labels) == ["0", "9" * 5000]


@pytest.mark.parametrize("changes, weights_length, message", [
    ({}, 100, "not a readable safetensors file"),  # truncated weights: SafetensorError
    ({"target_modules": "(["}, None, "not a regular expression"),  # re.error
    ({"rank_pattern": {"(?i)q_proj": 2}}, None, "not a regular expression"),  # re.error inside read_peft's pattern
    ({"modules_to_save": 5}, None, "modules_to_save"),  # TypeError
    ({"layers_to_transform": "x"}, None, "layers_to_transform"),
])
def test_junk_adapter_files_are_config_errors(peft_template, tmp_path, changes, weights_length, message) -> None:
    t = peft_template
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps({**t["config"], **changes}))
    (directory / "adapter_model.safetensors").write_bytes(t["weights"][:weights_length])
    with pytest.raises(ConfigError, match=message):
        read_peft(str(directory), t["family"], t["model_config"], 0, 6, t["linears"], torch.float32)


def test_a_deeply_nested_adapter_config_is_a_config_error(tmp_path) -> None:
    path = tmp_path / "adapter_config.json"
    path.write_text("[" * 100_000)  # RecursionError
    with pytest.raises(ConfigError, match="nested too deeply"):
        read_peft_config(path)


def test_a_peer_id_with_a_trailing_newline_is_refused() -> None:
    record = ServerRecord(peer_id="a" * 32, model="m", start=0, end=1, num_blocks=1, hidden_size=HIDDEN,
                          addresses=("tcp://127.0.0.1:9",), seq=1)
    wire = {**record_to_wire(record), "peer_id": "a" * 31 + "\n"}  # '$' of re.match took it
    with pytest.raises(ProtocolError, match="peer_id"):
        record_from_wire(wire)


def test_a_broken_adapter_is_bad_adapter_not_internal(fuzzer, baseline) -> None:
    """The server loads adapter `broken` (a truncated weights file) from its directory: `bad_adapter` (it was
    `internal`: read_peft raised SafetensorError)."""
    from swarm.transport.errors import BadAdapter

    with pytest.raises(BadAdapter) as info:
        fuzzer.good.call("forward", {"names": ["hidden"], "adapter": "broken"}, [torch.zeros(1, 2, HIDDEN)])
    assert info.value.code == "bad_adapter" and "safetensors" in str(info.value)
    fuzzer.check_serving()


def test_one_peer_cannot_fill_the_relay_mailbox_for_everyone(tiny_llama, start_server) -> None:
    from swarm.core.server.relay import MAX_WAITING

    server = start_server(tiny_llama, SPAN)
    with RpcClient(server.endpoint, RpcClientConfig(timeout=10)) as attacker, \
            RpcClient(server.endpoint, RpcClientConfig(timeout=10)) as user:
        session = attacker.call("open", {"batch_size": 1, "max_length": 8}).fields["session"]
        for i in range(MAX_WAITING):  # relayed steps whose input never comes, each waiting 600 s
            attacker.send_raw([bytes(f) for f in encode("step", 10 + i, {"session": session, "ticket": f"t{i}",
                                                                          "wait": 600.0, "names": []}, [])])
        deadline = time.monotonic() + 10
        while len(server.handler.mailbox) < MAX_WAITING and time.monotonic() < deadline:
            time.sleep(0.02)
        mine = user.call("open", {"batch_size": 1, "max_length": 8}).fields["session"]
        hidden = torch.randn(1, 2, HIDDEN)
        user.call("push", {"session": mine, "ticket": "x", "names": ["hidden"]}, [hidden])  # the previous server's
        out = user.call("step", {"session": mine, "ticket": "x", "names": []}).tensors[0]
        assert out.shape == hidden.shape
