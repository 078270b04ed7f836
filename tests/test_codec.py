"""Unit tests of the wire codec: round trips, and every malformed message refused with ProtocolError."""

from __future__ import annotations

import logging
import random
import threading

import msgpack
import pytest
import torch
import zmq

from swarm.transport.codec import (
    MAX_DIMS,
    MAX_HEADER_BYTES,
    MAX_TENSOR_BYTES,
    MAX_TENSORS,
    PROTOCOL_VERSION,
    decode,
    decode_header,
    dtype_from_name,
    dtype_name,
    encode,
)
from swarm.transport.errors import ProtocolError, VersionMismatch
from swarm.transport.rpc import ERROR, Request, RpcClient, RpcServer, RpcServerConfig

WAIT = 10.0  # seconds: the bound of every wait on a socket in this file


def _header(**fields) -> bytes:
    header = {"v": PROTOCOL_VERSION, "type": "forward", "id": 7, "tensors": []}
    header.update(fields)
    return msgpack.packb(header, use_bin_type=True)


def _as_bytes(frames: list) -> list[bytes]:
    """What a peer receives: plain byte strings (no shared memory with the sender's tensors)."""
    return [bytes(f) for f in frames]


# --- round trips -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_round_trip_dtypes(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        tensor = torch.rand(3, 5, generator=gen) > 0.5
    elif dtype == torch.int64:
        tensor = torch.randint(-(1 << 40), 1 << 40, (2, 3, 4), generator=gen)
    else:
        tensor = torch.randn(2, 3, 4, generator=gen).to(dtype)
    msg = decode(_as_bytes(encode("forward", 3, {"x": 1}, [tensor])))
    assert msg.type == "forward" and msg.id == 3 and msg.version == PROTOCOL_VERSION
    assert len(msg.tensors) == 1
    out = msg.tensors[0]
    assert out.dtype == dtype and out.shape == tensor.shape
    assert torch.equal(out, tensor)


def test_round_trip_special_float_values() -> None:
    tensor = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-45, 3.4e38])
    out = decode(_as_bytes(encode("t", 1, tensors=[tensor]))).tensors[0]
    assert torch.equal(out, tensor)
    assert torch.signbit(out[1])
    nan = decode(_as_bytes(encode("t", 1, tensors=[torch.tensor([float("nan")])]))).tensors[0]
    assert torch.isnan(nan).all()


@pytest.mark.parametrize("shape", [(0,), (2, 0, 4), (0, 0), ()])
def test_round_trip_zero_size_and_scalar(shape: tuple[int, ...]) -> None:
    tensor = torch.zeros(shape, dtype=torch.float32) if shape == () else torch.empty(shape, dtype=torch.float16)
    frames = encode("t", 1, tensors=[tensor])
    assert len(frames) == 2
    out = decode(_as_bytes(frames)).tensors[0]
    assert out.shape == tensor.shape and out.dtype == tensor.dtype
    assert torch.equal(out, tensor)


def test_round_trip_several_tensors_and_fields() -> None:
    tensors = [torch.randn(1, 4, 8), torch.ones(1, 4, dtype=torch.int64), torch.empty(0, dtype=torch.bool),
               torch.arange(6, dtype=torch.int64).reshape(2, 3).t()]  # last one is not contiguous
    fields = {"names": ["hidden", "attention_mask", "empty", "ints"], "blocks": [0, 3], "session": "abc",
              "nested": {"a": [1, 2.5, None, True]}, "blob": b"\x00\xff", "unicode": "héllo ✓"}
    frames = encode("step", (1 << 63) - 1, fields, tensors)
    assert len(frames) == 1 + len(tensors)
    msg = decode(_as_bytes(frames))
    assert msg.type == "step" and msg.id == (1 << 63) - 1
    assert msg.fields == fields
    assert msg.get("blocks") == [0, 3] and msg.get("missing", 5) == 5
    assert len(msg.tensors) == len(tensors)
    for out, tensor in zip(msg.tensors, tensors, strict=True):
        assert out.dtype == tensor.dtype and out.shape == tensor.shape
        assert torch.equal(out, tensor)


def test_decoded_tensors_are_writable_and_independent_of_frames() -> None:
    frames = _as_bytes(encode("t", 1, tensors=[torch.zeros(4)]))
    out = decode(frames).tensors[0]
    out += 1  # must not raise (not a read-only buffer)
    assert frames[1] == bytes(16)


def test_decode_accepts_memoryview_frames() -> None:
    tensor = torch.randn(2, 3)
    msg = decode(encode("t", 2, tensors=[tensor]))  # frames as encode returns them: bytes + memoryview
    assert torch.equal(msg.tensors[0], tensor)


def test_unknown_header_fields_are_kept() -> None:
    msg = decode([_header(future_field={"x": 1})])
    assert msg.fields == {"future_field": {"x": 1}}


def test_encode_refuses_reserved_field_names() -> None:
    for name in ("v", "type", "id", "tensors"):
        with pytest.raises(ValueError, match="reserved"):
            encode("t", 1, {name: 1})


def test_encode_refuses_dtypes_that_do_not_travel() -> None:
    with pytest.raises(ProtocolError):
        encode("t", 1, tensors=[torch.zeros(2, dtype=torch.complex64)])
    with pytest.raises(ProtocolError):
        dtype_name(torch.complex64)


def test_dtype_names() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool):
        assert dtype_from_name(dtype_name(dtype)) == dtype
    for bad in ("complex64", "torch.float32", "", None, 3, ["float32"]):
        with pytest.raises(ProtocolError):
            dtype_from_name(bad)


def test_header_is_version_type_id_and_specs() -> None:
    frames = encode("forward", 9, {"names": ["hidden"]}, [torch.zeros(1, 2, 3, dtype=torch.bfloat16)])
    header = msgpack.unpackb(frames[0], raw=False)
    assert header == {"v": PROTOCOL_VERSION, "type": "forward", "id": 9, "names": ["hidden"],
                      "tensors": [["bfloat16", [1, 2, 3]]]}
    assert decode_header(frames[0])["id"] == 9


# --- malformed messages ------------------------------------------------------------------------------------------


def test_empty_message() -> None:
    with pytest.raises(ProtocolError, match="empty"):
        decode([])


@pytest.mark.parametrize("frame", [b"", b"\xc1", b"\x92\x01", b"\xdc\xff\xff", b"not msgpack at all \xff\xfe",
                                   _header() + b"\x00"])  # last: valid map followed by trailing bytes
def test_header_not_msgpack(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode([frame])


@pytest.mark.parametrize("value", [[1, "forward", 7, []], "forward", 7, None, b"bytes", 1.5])
def test_header_not_a_map(value) -> None:
    with pytest.raises(ProtocolError, match="map"):
        decode([msgpack.packb(value, use_bin_type=True)])


def test_header_with_non_string_keys() -> None:
    with pytest.raises(ProtocolError):
        decode([msgpack.packb({1: 2, "v": PROTOCOL_VERSION, "type": "t", "id": 1}, use_bin_type=True)])


@pytest.mark.parametrize("fields", [{"type": None}, {"type": 5}, {"type": b"forward"}])
def test_missing_or_bad_type(fields) -> None:
    header = {"v": PROTOCOL_VERSION, "id": 1, **fields}
    if fields["type"] is None:
        del header["type"]
    with pytest.raises(ProtocolError, match="type"):
        decode([msgpack.packb(header, use_bin_type=True)])


@pytest.mark.parametrize("request_id", [None, "7", -1, 1 << 63, 1.0, True])
def test_missing_or_bad_id(request_id) -> None:
    header = {"v": PROTOCOL_VERSION, "type": "t"}
    if request_id is not None:
        header["id"] = request_id
    with pytest.raises(ProtocolError, match="id"):
        decode([msgpack.packb(header, use_bin_type=True)])


@pytest.mark.parametrize("version", [999, 0, 2, None, "1"])
def test_wrong_protocol_version(version) -> None:
    header = {"type": "t", "id": 1}
    if version is not None:
        header["v"] = version
    frame = msgpack.packb(header, use_bin_type=True)
    with pytest.raises(VersionMismatch) as info:
        decode([frame])
    assert isinstance(info.value, ProtocolError)
    assert info.value.code == "protocol_version"
    with pytest.raises(VersionMismatch):
        decode_header(frame)


def test_encode_with_other_version_is_refused_by_decode() -> None:
    with pytest.raises(VersionMismatch):
        decode(encode("t", 1, version=999))


def test_tensor_count_mismatch() -> None:
    frames = _as_bytes(encode("t", 1, tensors=[torch.zeros(2), torch.zeros(3)]))
    with pytest.raises(ProtocolError, match="2 tensors but 1"):
        decode(frames[:2])
    with pytest.raises(ProtocolError, match="2 tensors but 3"):
        decode([*frames, b""])
    with pytest.raises(ProtocolError):
        decode([_header(), bytes(4)])  # no tensors declared, one frame


@pytest.mark.parametrize("specs", ["float32", {"a": 1}, [["float32", [2]]] * (MAX_TENSORS + 1)])
def test_bad_tensor_list(specs) -> None:
    frames = [_header(tensors=specs)]
    if isinstance(specs, list):
        frames += [bytes(8)] * len(specs)
    with pytest.raises(ProtocolError):
        decode(frames)


@pytest.mark.parametrize("dtype,shape,size", [
    ("float32", [2, 3], 23),
    ("float32", [2, 3], 25),
    ("float32", [2, 3], 0),
    ("bfloat16", [4], 4),
    ("int64", [1], 4),
    ("bool", [3], 4),
    ("float16", [0], 2),
])
def test_frame_length_must_match_dtype_and_shape(dtype: str, shape: list[int], size: int) -> None:
    with pytest.raises(ProtocolError, match="bytes"):
        decode([_header(tensors=[[dtype, shape]]), bytes(size)])


@pytest.mark.parametrize("dtype", ["complex64", "float8", "", 5, None, ["float32"]])
def test_unknown_dtype(dtype) -> None:
    with pytest.raises(ProtocolError, match="dtype"):
        decode([_header(tensors=[[dtype, [1]]]), bytes(4)])


@pytest.mark.parametrize("spec", [
    ["float32", [-1]],
    ["float32", [2, -3]],
    ["float32", [1] * (MAX_DIMS + 1)],
    ["float32", [1.0]],
    ["float32", [True]],
    ["float32", ["2"]],
    ["float32", 4],
    ["float32", None],
    ["float32"],
    ["float32", [1], "extra"],
    "float32",
])
def test_bad_shape_or_spec(spec) -> None:
    with pytest.raises(ProtocolError):
        decode([_header(tensors=[spec]), bytes(4)])


def test_max_dims_allowed() -> None:
    tensor = torch.arange(2 ** MAX_DIMS, dtype=torch.int64).reshape([2] * MAX_DIMS)
    assert torch.equal(decode(_as_bytes(encode("t", 1, tensors=[tensor]))).tensors[0], tensor)


def test_huge_declared_tensor_is_refused_without_allocating() -> None:
    with pytest.raises(ProtocolError, match="larger"):
        decode([_header(tensors=[["float32", [1 << 30, 1 << 30]]]), b""])


# zero-size tensors whose other dimensions are huge: torch would overflow computing their strides
HUGE_EMPTY = [
    ["float32", [0, 2**39, 2**39, 2**39]],
    ["float32", [2**39, 0]],
    ["int8", [0, 2**62, 2**62]],
    ["bool", [0] * 7 + [2**64 - 1]],
    ["uint8", [0, MAX_TENSOR_BYTES + 1]],
    ["float32", [0, MAX_TENSOR_BYTES // 4, 2]],
]


@pytest.mark.parametrize("spec", HUGE_EMPTY)
def test_empty_tensor_with_huge_dimensions_is_refused(spec) -> None:
    with pytest.raises(ProtocolError, match="larger"):
        decode([_header(tensors=[spec]), b""])


@pytest.mark.parametrize("dtype,shape", [("uint8", [0, MAX_TENSOR_BYTES]), ("float32", [MAX_TENSOR_BYTES // 4, 0]),
                                         ("int64", [0, 0, 3])])
def test_empty_tensor_up_to_the_limit_is_accepted(dtype: str, shape: list[int]) -> None:
    tensor = decode([_header(tensors=[[dtype, shape]]), b""]).tensors[0]
    assert list(tensor.shape) == shape and tensor.numel() == 0


def _ping_handler(req: Request) -> None:
    req.reply({"pong": True})


def test_server_answers_a_huge_empty_tensor_with_bad_request_and_serves_on(caplog) -> None:
    with RpcServer(_ping_handler, RpcServerConfig(host="127.0.0.1", port=0, poll_ms=20)) as server, \
            RpcClient(server.endpoint) as client, caplog.at_level(logging.DEBUG, logger="swarm.transport"):
        for request_id, spec in enumerate(HUGE_EMPTY, start=100):
            client.send_raw([_header(id=request_id, tensors=[spec]), b""])
            reply = client.recv_raw(timeout=WAIT)
            assert reply is not None, "no reply to a huge empty tensor"
            answer = decode(reply)
            assert (answer.type, answer.id, answer.get("code")) == (ERROR, request_id, "bad_request")
        assert client.call("ping", timeout=WAIT).get("pong") is True
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_client_refuses_a_reply_with_a_huge_empty_tensor() -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"

    def answer() -> None:  # one reply, as a broken or hostile server would send it
        if router.poll(int(WAIT * 1000)):
            identity, *frames = router.recv_multipart()
            request = decode(frames)
            header = {"v": PROTOCOL_VERSION, "type": "result", "id": request.id, "tensors": [HUGE_EMPTY[0]]}
            router.send_multipart([identity, msgpack.packb(header), b""])

    peer = threading.Thread(target=answer, daemon=True)
    peer.start()
    try:
        with RpcClient(endpoint) as client, pytest.raises(ProtocolError, match="malformed reply.*larger"):
            client.call("forward", timeout=WAIT)
    finally:
        peer.join(WAIT)
        router.close(linger=0)
        ctx.term()


def test_oversized_header() -> None:
    frame = _header(padding="x" * MAX_HEADER_BYTES)
    assert len(frame) > MAX_HEADER_BYTES
    with pytest.raises(ProtocolError, match="larger"):
        decode([frame])
    with pytest.raises(ProtocolError, match="larger"):
        decode_header(frame)


def test_random_frames_raise_only_protocol_errors() -> None:
    rng = random.Random(1234)
    valid = _as_bytes(encode("t", 1, {"k": [1, 2]}, [torch.randn(2, 3), torch.ones(2, dtype=torch.int64)]))
    for i in range(200):
        kind = i % 4
        if kind == 0:  # pure noise
            frames = [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.randrange(1, 4))]
        elif kind == 1:  # a valid message with random bytes flipped in its header
            header = bytearray(valid[0])
            for _ in range(rng.randrange(1, 4)):
                header[rng.randrange(len(header))] = rng.randrange(256)
            frames = [bytes(header), *valid[1:]]
        elif kind == 2:  # a valid message truncated or with random tensor frames
            frames = [valid[0][: rng.randrange(len(valid[0]) + 1)],
                      *(rng.randbytes(rng.randrange(0, 40)) for _ in range(rng.randrange(0, 4)))]
        else:  # random msgpack-looking headers
            header = {rng.choice(["v", "type", "id", "tensors", "x"]): rng.choice(
                [1, -1, "t", None, [], [["float32", [2]]], [["int8", [rng.randrange(-2, 5)]]], {"a": 1}, 2.5, b"b"])
                for _ in range(rng.randrange(0, 6))}
            frames = [msgpack.packb(header, use_bin_type=True), rng.randbytes(rng.randrange(0, 9))]
        try:
            decode(frames)
        except ProtocolError:
            pass
