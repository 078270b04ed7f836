"""The server's protocol against a real in-process server: every bad input is refused with its stable error code,
and the server (and every other session) goes on serving correct results afterwards."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator

import msgpack
import pytest
import torch

from swarm.core.server.handler import HandlerLimits
from swarm.transport.codec import PROTOCOL_VERSION, decode, encode
from swarm.transport.errors import (
    BadRequest,
    CacheFull,
    RemoteError,
    SessionOverflow,
    UnknownSession,
    WrongBlocks,
)
from swarm.transport.rpc import ERROR, RpcClient, RpcClientConfig

SPAN = (0, 3)
HIDDEN = 64  # tiny_llama's hidden size
ATOL = 1e-5
REPLY_TIMEOUT = 10.0  # seconds; every wait in this file is bounded by this


# --- fixtures and helpers -----------------------------------------------------------------------------------------


class Sample:
    """Embeddings of a few token sequences and the reference output of blocks 0:3, computed by plain transformers."""

    def __init__(self, ref, seed: int, batch: int = 2, length: int = 6):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, ref.config.vocab_size, (batch, length), generator=gen)
        with torch.no_grad():
            states = ref(self.ids, output_hidden_states=True).hidden_states
        self.hidden = states[0].detach().clone()  # input of block 0 (the embeddings)
        self.expected = states[SPAN[1]].detach().clone()  # output of block 2


@pytest.fixture(scope="module")
def sample(tiny_llama_ref) -> Sample:
    return Sample(tiny_llama_ref, seed=1)


@pytest.fixture(scope="module")
def other_sample(tiny_llama_ref) -> Sample:
    return Sample(tiny_llama_ref, seed=2, batch=1, length=5)


@pytest.fixture
def server(start_server, tiny_llama):
    return start_server(tiny_llama, SPAN)


@pytest.fixture
def connect() -> Iterator[Callable[[str], RpcClient]]:
    clients: list[RpcClient] = []

    def make(endpoint: str) -> RpcClient:
        client = RpcClient(endpoint, RpcClientConfig(timeout=REPLY_TIMEOUT))
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for client in clients:
            client.close()


@pytest.fixture
def client(server, connect) -> RpcClient:
    return connect(server.endpoint)


def forward(client: RpcClient, hidden: torch.Tensor, **fields) -> torch.Tensor:
    reply = client.call("forward", {"names": ["hidden"], **fields}, [hidden])
    assert reply.type == "result" and len(reply.tensors) == 1
    return reply.tensors[0]


def assert_serving(client: RpcClient, sample: Sample) -> None:
    """A clean forward request still gives the reference result."""
    out = forward(client, sample.hidden)
    assert out.shape == sample.expected.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, sample.expected, atol=ATOL, rtol=0)


def open_session(client: RpcClient, batch: int, max_length: int, **fields) -> str:
    reply = client.call("open", {"batch_size": batch, "max_length": max_length, **fields})
    session = reply.get("session")
    assert isinstance(session, str) and session
    return session


def step(client: RpcClient, session: str, hidden: torch.Tensor, **fields) -> torch.Tensor:
    reply = client.call("step", {"session": session, "names": ["hidden"], **fields}, [hidden])
    assert reply.type == "result" and len(reply.tensors) == 1
    return reply.tensors[0]


def refused(exc_type: type[RemoteError], code: str, call: Callable[[], object]) -> RemoteError:
    with pytest.raises(exc_type) as info:
        call()
    assert type(info.value) is exc_type, f"expected {exc_type.__name__}, got {type(info.value).__name__}"
    assert info.value.code == code, info.value
    return info.value


def raw_exchange(client: RpcClient, frames: list) -> dict:
    """Send frames as they are and return the decoded reply (which must be an error)."""
    client.send_raw(frames)
    reply = client.recv_raw(timeout=REPLY_TIMEOUT)
    assert reply is not None, "no reply to a malformed message"
    msg = decode(reply)
    assert msg.type == ERROR
    assert isinstance(msg.get("message"), str) and msg.get("message")
    return {"id": msg.id, "code": msg.get("code")}


# --- sanity: the protocol works, and the results are right ----------------------------------------------------------


def test_ping_and_forward_match_transformers(client, sample) -> None:
    assert client.call("ping").type == "result"
    assert_serving(client, sample)
    # a sub-range of the span, and the default names (one tensor, no names field)
    out = client.call("forward", {"blocks": [0, 3]}, [sample.hidden]).tensors[0]
    torch.testing.assert_close(out, sample.expected, atol=ATOL, rtol=0)


def test_forward_with_attention_mask_matches_unpadded_reference(client, sample, tiny_llama_ref) -> None:
    ones = torch.ones(sample.ids.shape, dtype=torch.int64)
    out = client.call("forward", {"names": ["hidden", "attention_mask"]}, [sample.hidden, ones]).tensors[0]
    torch.testing.assert_close(out, sample.expected, atol=ATOL, rtol=0)

    # left padding on row 0: its real tokens give the same output as the unpadded row alone
    pad = 2
    mask = ones.clone()
    mask[0, :pad] = 0
    hidden = sample.hidden.clone()
    hidden[0, :pad] = 0.0
    out = client.call("forward", {"names": ["hidden", "attention_mask"]}, [hidden, mask.bool()]).tensors[0]
    with torch.no_grad():
        states = tiny_llama_ref(sample.ids[:1, pad:], output_hidden_states=True).hidden_states
    torch.testing.assert_close(out[0, pad:], states[SPAN[1]][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1], sample.expected[1], atol=ATOL, rtol=0)


def test_info(server, client, tiny_llama) -> None:
    info = client.call("info").fields
    assert info["model"] == tiny_llama.name  # a local directory is announced by its name
    assert info["family"] == "llama"
    assert (info["start"], info["end"]) == SPAN
    assert info["num_blocks"] == 6
    assert info["hidden_size"] == HIDDEN
    assert info["dtype"] == "float32"
    assert info["protocol"] == PROTOCOL_VERSION == 1
    assert info["cache_tokens_total"] == server.config.cache_tokens
    assert info["cache_tokens_free"] == info["cache_tokens_total"]
    assert info["sessions"] == 0
    assert info["accepting"] is True
    assert isinstance(info["cache_bytes_per_token"], int) and info["cache_bytes_per_token"] > 0

    opened = client.call("open", {"batch_size": 2, "max_length": 10})
    info = client.call("info").fields
    assert info["sessions"] == 1
    assert info["cache_tokens_free"] == info["cache_tokens_total"] - 20 == opened.get("cache_tokens_free")


# --- bad forward requests ----------------------------------------------------------------------------------------


def _hidden(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape).to(dtype)


def _with_value(value: float) -> torch.Tensor:
    hidden = torch.randn(1, 4, HIDDEN)
    hidden[0, 2, 5] = value
    return hidden


BAD_FORWARDS: dict[str, tuple[dict, Callable[[], list[torch.Tensor]]]] = {
    "wrong_hidden_size": ({"names": ["hidden"]}, lambda: [_hidden(1, 4, HIDDEN // 2)]),
    "hidden_2d": ({"names": ["hidden"]}, lambda: [_hidden(4, HIDDEN)]),
    "hidden_4d": ({"names": ["hidden"]}, lambda: [_hidden(1, 1, 4, HIDDEN)]),
    "hidden_int": ({"names": ["hidden"]}, lambda: [torch.ones(1, 4, HIDDEN, dtype=torch.int64)]),
    "hidden_bool": ({"names": ["hidden"]}, lambda: [torch.ones(1, 4, HIDDEN, dtype=torch.bool)]),
    "hidden_nan": ({"names": ["hidden"]}, lambda: [_with_value(float("nan"))]),
    "hidden_inf": ({"names": ["hidden"]}, lambda: [_with_value(float("-inf"))]),
    "hidden_empty_length": ({"names": ["hidden"]}, lambda: [_hidden(1, 0, HIDDEN)]),
    "hidden_empty_batch": ({"names": ["hidden"]}, lambda: [_hidden(0, 4, HIDDEN)]),
    "blocks_negative": ({"names": ["hidden"], "blocks": [-1, 2]}, lambda: [_hidden(1, 4, HIDDEN)]),
    "blocks_empty": ({"names": ["hidden"], "blocks": [2, 2]}, lambda: [_hidden(1, 4, HIDDEN)]),
    "blocks_reversed": ({"names": ["hidden"], "blocks": [2, 1]}, lambda: [_hidden(1, 4, HIDDEN)]),
    "blocks_string": ({"names": ["hidden"], "blocks": "0:3"}, lambda: [_hidden(1, 4, HIDDEN)]),
    "blocks_three": ({"names": ["hidden"], "blocks": [0, 1, 2]}, lambda: [_hidden(1, 4, HIDDEN)]),
    "blocks_bool": ({"names": ["hidden"], "blocks": [False, True]}, lambda: [_hidden(1, 4, HIDDEN)]),
    "blocks_float": ({"names": ["hidden"], "blocks": [0.0, 2.0]}, lambda: [_hidden(1, 4, HIDDEN)]),
    "mask_short": ({"names": ["hidden", "attention_mask"]},
                   lambda: [_hidden(1, 4, HIDDEN), torch.ones(1, 3, dtype=torch.int64)]),
    "mask_batch": ({"names": ["hidden", "attention_mask"]},
                   lambda: [_hidden(1, 4, HIDDEN), torch.ones(2, 4, dtype=torch.int64)]),
    "mask_1d": ({"names": ["hidden", "attention_mask"]},
                lambda: [_hidden(1, 4, HIDDEN), torch.ones(4, dtype=torch.int64)]),
    "mask_float": ({"names": ["hidden", "attention_mask"]},
                   lambda: [_hidden(1, 4, HIDDEN), torch.ones(1, 4)]),
    "mask_two": ({"names": ["hidden", "attention_mask"]},
                 lambda: [_hidden(1, 4, HIDDEN), torch.tensor([[1, 1, 2, 1]])]),
    "mask_negative": ({"names": ["hidden", "attention_mask"]},
                      lambda: [_hidden(1, 4, HIDDEN), torch.tensor([[0, -1, 1, 1]])]),
    "names_unknown": ({"names": ["hidden", "extra"]}, lambda: [_hidden(1, 4, HIDDEN), _hidden(1, 4, HIDDEN)]),
    "names_missing_hidden": ({"names": ["attention_mask"]}, lambda: [torch.ones(1, 4, dtype=torch.int64)]),
    "names_wrong": ({"names": ["hiddden"]}, lambda: [_hidden(1, 4, HIDDEN)]),
    "names_too_few": ({"names": ["hidden"]}, lambda: [_hidden(1, 4, HIDDEN), torch.ones(1, 4, dtype=torch.int64)]),
    "names_too_many": ({"names": ["hidden", "attention_mask"]}, lambda: [_hidden(1, 4, HIDDEN)]),
    "names_duplicate": ({"names": ["hidden", "hidden"]}, lambda: [_hidden(1, 4, HIDDEN), _hidden(1, 4, HIDDEN)]),
    "names_not_list": ({"names": "hidden"}, lambda: [_hidden(1, 4, HIDDEN)]),
    "names_absent_two_tensors": ({}, lambda: [_hidden(1, 4, HIDDEN), torch.ones(1, 4, dtype=torch.int64)]),
    "no_tensors": ({"names": []}, lambda: []),
    "no_tensors_no_names": ({}, lambda: []),
}


@pytest.mark.parametrize("case", list(BAD_FORWARDS))
def test_bad_forward_is_refused_and_server_goes_on(client, sample, case: str) -> None:
    fields, tensors = BAD_FORWARDS[case]
    error = refused(BadRequest, "bad_request", lambda: client.call("forward", fields, tensors()))
    assert error.peer == client.endpoint
    assert error.remote_message
    assert_serving(client, sample)


@pytest.mark.parametrize("blocks", [[1, 4], [3, 5], [0, 4], [3, 6]])
def test_blocks_outside_the_span_are_refused_as_wrong_blocks(client, sample, blocks) -> None:
    """Not the client's fault but a route built on a record that does not match the server: a code of its own, so
    the client routes around this server instead of giving up."""
    refused(WrongBlocks, "wrong_blocks", lambda: client.call("forward", {"names": ["hidden"], "blocks": blocks},
                                                             [_hidden(1, 4, HIDDEN)]))
    refused(WrongBlocks, "wrong_blocks", lambda: client.call("open", {"max_length": 4, "blocks": blocks}))
    assert client.call("info").fields["sessions"] == 0
    assert_serving(client, sample)


def test_bad_backward_is_refused(client, sample) -> None:
    hidden = sample.hidden
    refused(BadRequest, "bad_request",
            lambda: client.call("backward", {"names": ["hidden", "grad_output"]}, [hidden, hidden[:, :-1]]))
    refused(BadRequest, "bad_request", lambda: client.call("backward", {"names": ["hidden"]}, [hidden]))
    refused(BadRequest, "bad_request",
            lambda: client.call("backward", {"names": ["hidden", "grad_output"]}, [hidden, _with_value(float("nan"))]))
    grad = client.call("backward", {"names": ["hidden", "grad_output"]}, [hidden, torch.ones_like(hidden)])
    assert grad.tensors[0].shape == hidden.shape and torch.isfinite(grad.tensors[0]).all()
    assert_serving(client, sample)


@pytest.mark.parametrize("msg_type", ["nope", "", "result", "error", "FORWARD", "forward "])
def test_unknown_request_type(client, sample, msg_type: str) -> None:
    refused(BadRequest, "unknown_method", lambda: client.call(msg_type, {"names": ["hidden"]}, [sample.hidden]))
    assert_serving(client, sample)


def test_too_many_tokens_in_one_request(start_server, tiny_llama, connect, sample) -> None:
    server = start_server(tiny_llama, SPAN, limits=HandlerLimits(max_request_tokens=8, max_batch=2))
    client = connect(server.endpoint)
    refused(BadRequest, "bad_request", lambda: forward(client, _hidden(1, 9, HIDDEN)))
    refused(BadRequest, "bad_request", lambda: forward(client, _hidden(3, 1, HIDDEN)))
    refused(BadRequest, "bad_request", lambda: client.call("open", {"batch_size": 3, "max_length": 4}))
    out = forward(client, sample.hidden[:, :4])
    torch.testing.assert_close(out, sample.expected[:, :4], atol=ATOL, rtol=0)


# --- sessions ----------------------------------------------------------------------------------------------------


def test_session_steps_match_reference(client, sample) -> None:
    session = open_session(client, batch=2, max_length=6)
    outs = [step(client, session, sample.hidden[:, 0:3]), step(client, session, sample.hidden[:, 3:4]),
            step(client, session, sample.hidden[:, 4:6])]
    torch.testing.assert_close(torch.cat(outs, dim=1), sample.expected, atol=ATOL, rtol=0)
    assert client.call("close", {"session": session}).type == "result"
    refused(UnknownSession, "unknown_session", lambda: step(client, session, sample.hidden[:, :1]))


@pytest.mark.parametrize("session", ["0" * 32, "nope", "x" * 64])
def test_step_with_unknown_session(client, sample, session: str) -> None:
    refused(UnknownSession, "unknown_session", lambda: step(client, session, sample.hidden[:, :1]))
    assert_serving(client, sample)


@pytest.mark.parametrize("session", [None, "", 5, ["abc"], "x" * 65])
def test_step_or_close_with_malformed_session_id(client, sample, session) -> None:
    fields = {} if session is None else {"session": session}
    refused(BadRequest, "bad_request", lambda: client.call("step", {**fields, "names": ["hidden"]},
                                                           [sample.hidden[:, :1]]))
    refused(BadRequest, "bad_request", lambda: client.call("close", fields))
    assert_serving(client, sample)


def test_close_unknown_session_is_harmless(client, sample) -> None:
    assert client.call("close", {"session": "0" * 32}).type == "result"
    assert client.call("info").get("sessions") == 0
    assert_serving(client, sample)


def test_step_past_max_length_overflows_and_session_goes_on(client, sample) -> None:
    session = open_session(client, batch=2, max_length=4)
    first = step(client, session, sample.hidden[:, 0:3])
    error = refused(SessionOverflow, "session_overflow", lambda: step(client, session, sample.hidden[:, 3:5]))
    assert "max_length" in error.remote_message
    refused(SessionOverflow, "session_overflow", lambda: step(client, session, sample.hidden[:, 0:5], start=0))
    # the refused steps left the cache as it was: the next valid step continues the sequence
    last = step(client, session, sample.hidden[:, 3:4])
    torch.testing.assert_close(torch.cat([first, last], dim=1), sample.expected[:, :4], atol=ATOL, rtol=0)
    # the session is full now
    refused(SessionOverflow, "session_overflow", lambda: step(client, session, sample.hidden[:, 4:5]))
    # rewinding with `start` regenerates from an earlier point
    again = step(client, session, sample.hidden[:, 2:4], start=2)
    torch.testing.assert_close(again, sample.expected[:, 2:4], atol=ATOL, rtol=0)
    assert_serving(client, sample)


def test_step_with_bad_start(client, sample) -> None:
    session = open_session(client, batch=2, max_length=6)
    first = step(client, session, sample.hidden[:, 0:2])
    for start in (3, -1, "1", 1.0, True):
        refused(BadRequest, "bad_request", lambda s=start: step(client, session, sample.hidden[:, 2:3], start=s))
    rest = step(client, session, sample.hidden[:, 2:6])
    torch.testing.assert_close(torch.cat([first, rest], dim=1), sample.expected, atol=ATOL, rtol=0)


def test_step_with_other_batch_size_than_opened(client, sample) -> None:
    session = open_session(client, batch=2, max_length=6)
    first = step(client, session, sample.hidden[:, 0:2])
    refused(BadRequest, "bad_request", lambda: step(client, session, sample.hidden[:1, 2:3]))
    refused(BadRequest, "bad_request", lambda: step(client, session, torch.cat([sample.hidden] * 2)[:, 2:3]))
    rest = step(client, session, sample.hidden[:, 2:6])
    torch.testing.assert_close(torch.cat([first, rest], dim=1), sample.expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["wrong_hidden_size", "hidden_2d", "hidden_int", "hidden_nan", "hidden_empty_length",
                                  "mask_short", "mask_two", "mask_float", "names_unknown", "names_too_many",
                                  "no_tensors"])
def test_bad_step_leaves_session_intact(client, sample, case: str) -> None:
    session = open_session(client, batch=1, max_length=6)
    first = step(client, session, sample.hidden[:1, 0:2])
    fields, tensors = BAD_FORWARDS[case]
    refused(BadRequest, "bad_request", lambda: client.call("step", {"session": session, **fields}, tensors()))
    rest = step(client, session, sample.hidden[:1, 2:6])
    torch.testing.assert_close(torch.cat([first, rest], dim=1), sample.expected[:1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("fields", [
    {"batch_size": 1, "max_length": 0},
    {"batch_size": 1, "max_length": -5},
    {"batch_size": 1, "max_length": "100"},
    {"batch_size": 1, "max_length": 10.0},
    {"batch_size": 1, "max_length": True},
    {"batch_size": 1, "max_length": None},
    {"batch_size": 1},
    {"batch_size": 1, "max_length": (1 << 17) + 1},
    {"batch_size": 0, "max_length": 10},
    {"batch_size": -1, "max_length": 10},
    {"batch_size": "2", "max_length": 10},
    {"batch_size": 1025, "max_length": 1},
    {"batch_size": 1, "max_length": 10, "blocks": "0:3"},
])
def test_bad_open(client, sample, fields) -> None:
    refused(BadRequest, "bad_request", lambda: client.call("open", fields))
    info = client.call("info").fields
    assert info["sessions"] == 0 and info["cache_tokens_free"] == info["cache_tokens_total"]
    assert_serving(client, sample)


def test_session_on_a_sub_range_of_blocks(client, tiny_llama_ref, sample) -> None:
    session = open_session(client, batch=2, max_length=6, blocks=[1, 2])
    with torch.no_grad():
        states = tiny_llama_ref(sample.ids, output_hidden_states=True).hidden_states
    out = torch.cat([step(client, session, states[1][:, :4]), step(client, session, states[1][:, 4:])], dim=1)
    torch.testing.assert_close(out, states[2], atol=ATOL, rtol=0)


def test_cache_full_and_close_frees_budget(start_server, tiny_llama, connect, sample) -> None:
    server = start_server(tiny_llama, SPAN, cache_tokens=64)
    client = connect(server.endpoint)
    info = client.call("info").fields
    assert info["cache_tokens_total"] == 64 and info["cache_tokens_free"] == 64

    error = refused(CacheFull, "cache_full", lambda: open_session(client, batch=1, max_length=100))
    assert "cache" in error.remote_message
    assert client.call("info").get("cache_tokens_free") == 64
    refused(CacheFull, "cache_full", lambda: open_session(client, batch=2, max_length=33))

    first = open_session(client, batch=2, max_length=20)
    assert client.call("info").get("cache_tokens_free") == 24
    second = open_session(client, batch=1, max_length=24)
    assert client.call("info").get("cache_tokens_free") == 0
    refused(CacheFull, "cache_full", lambda: open_session(client, batch=1, max_length=1))
    assert_serving(client, sample)  # forward needs no cache budget

    client.call("close", {"session": first})
    assert client.call("info").get("cache_tokens_free") == 40
    client.call("close", {"session": first})  # closing twice frees nothing more
    assert client.call("info").get("cache_tokens_free") == 40
    third = open_session(client, batch=2, max_length=20)
    out = step(client, third, sample.hidden)
    torch.testing.assert_close(out, sample.expected, atol=ATOL, rtol=0)
    client.call("close", {"session": second})
    client.call("close", {"session": third})
    info = client.call("info").fields
    assert info["cache_tokens_free"] == 64 and info["sessions"] == 0
    open_session(client, batch=1, max_length=64)


def test_sessions_of_different_clients_are_independent(server, connect, sample, other_sample) -> None:
    alice, bob = connect(server.endpoint), connect(server.endpoint)
    a = open_session(alice, batch=2, max_length=6)
    b = open_session(bob, batch=1, max_length=5)
    assert a != b
    a_outs = [step(alice, a, sample.hidden[:, 0:2])]
    b_outs = [step(bob, b, other_sample.hidden[:, 0:3])]

    # bob misbehaves in his own session in every way he can
    refused(BadRequest, "bad_request", lambda: step(bob, b, _hidden(1, 1, HIDDEN // 2)))
    refused(BadRequest, "bad_request", lambda: step(bob, b, _with_value(float("nan"))))
    refused(BadRequest, "bad_request", lambda: step(bob, b, _hidden(2, 1, HIDDEN)))
    refused(SessionOverflow, "session_overflow", lambda: step(bob, b, _hidden(1, 3, HIDDEN)))
    refused(UnknownSession, "unknown_session", lambda: step(bob, "f" * 32, _hidden(1, 1, HIDDEN)))
    bob.send_raw([b"\xc1garbage"])
    assert bob.recv_raw(timeout=REPLY_TIMEOUT) is not None

    # alice's session goes on as if nothing happened
    a_outs.append(step(alice, a, sample.hidden[:, 2:6]))
    torch.testing.assert_close(torch.cat(a_outs, dim=1), sample.expected, atol=ATOL, rtol=0)

    # so does bob's own, and closing it does not touch alice's
    b_outs.append(step(bob, b, other_sample.hidden[:, 3:5]))
    torch.testing.assert_close(torch.cat(b_outs, dim=1), other_sample.expected, atol=ATOL, rtol=0)
    bob.call("close", {"session": b})
    assert alice.call("info").get("sessions") == 1
    again = step(alice, a, sample.hidden[:, 2:6], start=2)
    torch.testing.assert_close(again, sample.expected[:, 2:6], atol=ATOL, rtol=0)


def _wait_for_sessions(client: RpcClient, count: int, timeout: float = 3.0) -> dict:
    end = time.monotonic() + timeout
    while True:
        info = client.call("info").fields
        if info["sessions"] == count or time.monotonic() > end:
            return info
        time.sleep(0.05)


def test_idle_session_expires(start_server, tiny_llama, connect, sample) -> None:
    server = start_server(tiny_llama, SPAN, limits=HandlerLimits(session_timeout=0.3), poll_ms=20)
    client = connect(server.endpoint)
    session = open_session(client, batch=2, max_length=10)
    step(client, session, sample.hidden[:, :2])
    info = client.call("info").fields
    assert info["cache_tokens_free"] == info["cache_tokens_total"] - 20

    info = _wait_for_sessions(client, 0)
    assert info["sessions"] == 0, "the idle session did not expire within 3 s"
    assert info["cache_tokens_free"] == info["cache_tokens_total"]
    refused(UnknownSession, "unknown_session", lambda: step(client, session, sample.hidden[:, 2:3]))
    assert_serving(client, sample)


def test_active_session_does_not_expire(start_server, tiny_llama, connect, sample) -> None:
    server = start_server(tiny_llama, SPAN, limits=HandlerLimits(session_timeout=1.0), poll_ms=20)
    client = connect(server.endpoint)
    session = open_session(client, batch=2, max_length=6)
    outs = []
    for i in range(6):  # one token every 0.25 s: 1.5 s in all, never 1 s idle
        outs.append(step(client, session, sample.hidden[:, i:i + 1]))
        time.sleep(0.25)
    torch.testing.assert_close(torch.cat(outs, dim=1), sample.expected, atol=ATOL, rtol=0)
    assert _wait_for_sessions(client, 0)["sessions"] == 0


# --- malformed messages on the wire ------------------------------------------------------------------------------


def test_garbage_frames_get_error_replies(client, sample) -> None:
    rng = random.Random(7)
    for _ in range(5):  # 0xc1 is never valid msgpack
        assert raw_exchange(client, [b"\xc1" + rng.randbytes(rng.randrange(0, 40))]) == {"id": 0,
                                                                                        "code": "bad_request"}
    for _ in range(10):  # pure noise, possibly several frames
        frames = [rng.randbytes(rng.randrange(1, 40)) for _ in range(rng.randrange(1, 4))]
        reply = raw_exchange(client, frames)
        assert reply["code"] in ("bad_request", "protocol_version")
    assert raw_exchange(client, [b""]) == {"id": 0, "code": "bad_request"}
    assert raw_exchange(client, [msgpack.packb([1, "forward", 3, []])]) == {"id": 0, "code": "bad_request"}
    assert raw_exchange(client, [msgpack.packb("forward")]) == {"id": 0, "code": "bad_request"}
    assert_serving(client, sample)


def test_wrong_protocol_version_gets_protocol_version_error(client, sample) -> None:
    frames = encode("forward", 31, {"names": ["hidden"]}, [sample.hidden], version=999)
    assert raw_exchange(client, frames) == {"id": 0, "code": "protocol_version"}
    no_version = msgpack.packb({"type": "ping", "id": 32, "tensors": []})
    assert raw_exchange(client, [no_version]) == {"id": 0, "code": "protocol_version"}
    assert_serving(client, sample)


def test_malformed_header_with_valid_id_is_answered_under_that_id(client, sample) -> None:
    frames = encode("forward", 4242, {"names": ["hidden", "attention_mask"]},
                    [sample.hidden, torch.ones(sample.ids.shape, dtype=torch.int64)])
    assert raw_exchange(client, frames[:2]) == {"id": 4242, "code": "bad_request"}  # declares 2 tensors, sends 1
    assert raw_exchange(client, [*frames, b"extra"]) == {"id": 4242, "code": "bad_request"}
    header = msgpack.packb({"v": PROTOCOL_VERSION, "type": "forward", "id": 4243, "names": ["hidden"],
                            "tensors": [["float32", list(sample.hidden.shape)]]})
    assert raw_exchange(client, [header, bytes(sample.hidden.numel() * 4 - 4)]) == {"id": 4243,
                                                                                    "code": "bad_request"}
    bad_dtype = msgpack.packb({"v": PROTOCOL_VERSION, "type": "forward", "id": 4244, "tensors": [["complex", [1]]]})
    assert raw_exchange(client, [bad_dtype, bytes(8)]) == {"id": 4244, "code": "bad_request"}
    assert_serving(client, sample)


def test_raw_request_with_valid_frames_is_answered(client, sample) -> None:
    """send_raw/recv_raw themselves work: a well-formed raw request gets a normal result under its id."""
    client.send_raw([bytes(f) for f in encode("forward", 777, {"names": ["hidden"]}, [sample.hidden])])
    reply = client.recv_raw(timeout=REPLY_TIMEOUT)
    assert reply is not None
    msg = decode(reply)
    assert msg.type == "result" and msg.id == 777
    torch.testing.assert_close(msg.tensors[0], sample.expected, atol=ATOL, rtol=0)
