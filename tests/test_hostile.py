"""One tenant cannot hurt the others: what an attacker on loopback tried against a server, each now refused or
bounded, and the other clients still served in time.

Each test plays the attacker with nothing but the documented wire format (raw frames where needed), then checks a
well-behaved client: its answers, and how long it waited.
"""

from __future__ import annotations

import time

import msgpack
import torch

from swarm.core.server.engine import QueueLimits
from swarm.core.server.handler import HandlerLimits
from swarm.core.server.scheduler import PassLimits
from swarm.transport.codec import PROTOCOL_VERSION, decode, encode
from swarm.transport.errors import BadRequest, ServerBusy
from swarm.transport.rpc import RpcClient, RpcClientConfig

HIDDEN = 64


def hidden(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def open_session(client: RpcClient, batch: int = 1, max_length: int = 32) -> str:
    return client.call("open", {"batch_size": batch, "max_length": max_length}).fields["session"]


def timed_step(client: RpcClient, session: str, h: torch.Tensor) -> float:
    started = time.perf_counter()
    reply = client.call("step", {"session": session, "names": ["hidden"]}, [h])
    assert reply.tensors[0].shape == h.shape
    return time.perf_counter() - started


def drain(client: RpcClient, count: int, timeout: float = 60.0) -> list[dict]:
    """Read up to `count` raw replies (bounded in time); their headers."""
    headers, deadline = [], time.monotonic() + timeout
    while len(headers) < count and time.monotonic() < deadline:
        frames = client.recv_raw(timeout=max(0.01, deadline - time.monotonic()))
        if frames is None:
            break
        message = decode(frames)
        headers.append({"type": message.type, **message.fields})
    return headers


def test_a_flood_of_zero_sized_overflowing_specs_is_refused_and_expiry_goes_on(tiny_llama, start_server):
    server = start_server(tiny_llama, (0, 6), limits=HandlerLimits(session_timeout=1.0))
    with RpcClient(server.endpoint, RpcClientConfig(timeout=10)) as user, RpcClient(server.endpoint) as attacker:
        open_session(user)
        header = {"v": PROTOCOL_VERSION, "type": "forward", "id": 1, "names": ["hidden"],
                  "tensors": [["float32", [0, 2 ** 39, 2 ** 39, 2 ** 39]]]}
        frames = [msgpack.packb(header), b""]
        started = time.monotonic()
        for _ in range(300):
            attacker.send_raw(frames)
        replies = drain(attacker, 300)
        assert len(replies) == 300 and all(r["type"] == "error" and r["code"] == "bad_request" for r in replies)
        # the session expired on time all the same (the I/O loop was never stuck)
        deadline = time.monotonic() + 10
        while user.call("info").fields["sessions"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert user.call("info").fields["sessions"] == 0
        assert time.monotonic() - started < 10


def test_a_forward_past_what_a_pass_may_hold_is_refused_at_once(tiny_llama, start_server):
    server = start_server(tiny_llama, (0, 6))
    with RpcClient(server.endpoint) as client:
        limit = client.call("info").fields["max_forward_length"]
        started = time.perf_counter()
        try:
            client.call("forward", {"names": ["hidden"]}, [torch.zeros(1, 1 << 16, HIDDEN)])
            raise AssertionError("a 65,536-token sequence was accepted")
        except BadRequest as e:
            assert str(limit) in str(e)
        assert time.perf_counter() - started < 5  # refused on arrival, not after minutes of compute


def test_a_long_forward_does_not_hold_others_steps(tiny_llama, start_server):
    """The longest forward a server takes (a dense mask would be 256 MiB) runs in chunks between others' steps."""
    server = start_server(tiny_llama, (0, 6), cache_tokens=1 << 15, passes=PassLimits(max_tokens=256))
    with RpcClient(server.endpoint, RpcClientConfig(timeout=120)) as user, \
            RpcClient(server.endpoint, RpcClientConfig(timeout=120)) as attacker:
        session = open_session(user)
        timed_step(user, session, hidden(1, 4, HIDDEN))
        length = user.call("info").fields["max_forward_length"]
        mask = torch.ones(1, length, dtype=torch.long)
        mask[0, 0] = 0  # padded: the mask cannot be left implicit
        attacker.send_raw(encode("forward", 7, {"names": ["hidden", "attention_mask"]},
                                 [hidden(1, length, HIDDEN, seed=1), mask]))
        time.sleep(0.3)  # let it start
        assert user.call("info").fields["queue"] == 1
        waits = [timed_step(user, session, hidden(1, 1, HIDDEN, seed=i)) for i in range(5)]
        assert max(waits) < 2.0, waits  # it took 5 s whole on this model, 63 s at 16,384 tokens before
        reply = drain(attacker, 1, timeout=120)
        assert reply and reply[0]["type"] == "result"


def test_queued_bytes_are_bounded_with_busy(tiny_llama, start_server):
    queue = QueueLimits(max_bytes=32 << 20)
    server = start_server(tiny_llama, (0, 6), queue=queue)
    with RpcClient(server.endpoint) as attacker, RpcClient(server.endpoint) as user:
        big = torch.zeros(16, 2048, HIDDEN)  # 8 MiB each: the attacker may hold half of 32 MiB
        for i in range(12):
            attacker.send_raw(encode("forward", i + 1, {"names": ["hidden"]}, [big]))
        replies = drain(attacker, 12, timeout=120)
        busy = [r for r in replies if r["type"] == "error"]
        assert len(replies) == 12 and len(busy) >= 10 and all(r["code"] == "busy" for r in busy)
        assert user.call("forward", {"names": ["hidden"]}, [hidden(1, 4, HIDDEN)]).tensors[0].shape == (1, 4, HIDDEN)


def test_one_client_flooding_steps_does_not_delay_another(tiny_llama, start_server):
    server = start_server(tiny_llama, (0, 6))
    with RpcClient(server.endpoint, RpcClientConfig(timeout=60)) as attacker, \
            RpcClient(server.endpoint, RpcClientConfig(timeout=60)) as user:
        sessions = [open_session(attacker, max_length=400) for _ in range(8)]
        mine = open_session(user)
        one = hidden(1, 1, HIDDEN)
        for i in range(2000):
            attacker.send_raw(encode("step", i + 1, {"session": sessions[i % 8], "names": ["hidden"]}, [one]))
        time.sleep(0.2)
        waits = [timed_step(user, mine, one) for _ in range(5)]
        assert max(waits) < 1.0, waits  # it waited 9 s behind them before
        replies = drain(attacker, 2000, timeout=120)
        assert {r["type"] for r in replies} <= {"result", "error"}
        refused = [r for r in replies if r["type"] == "error"]
        assert all(r["code"] in ("busy", "session_overflow") for r in refused)


def test_refused_steps_do_not_keep_a_session_alive(tiny_llama, start_server):
    server = start_server(tiny_llama, (0, 6), limits=HandlerLimits(session_timeout=1.0))
    with RpcClient(server.endpoint) as client:
        session = open_session(client, batch=1)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            try:  # a batch of 2 in a session of 1: refused, does nothing
                client.call("step", {"session": session, "names": ["hidden"]}, [hidden(2, 1, HIDDEN)])
            except BadRequest:
                pass
            except Exception as e:  # the session expired: what this test waits for
                assert "unknown session" in str(e)
                break
            time.sleep(0.1)
        assert client.call("info").fields["sessions"] == 0
        assert client.call("info").fields["cache_tokens_free"] == client.call("info").fields["cache_tokens_total"]


__all__ = ["ServerBusy"]


def test_kept_graphs_are_bounded_by_bytes(tiny_llama, start_server):
    """A forward that keeps its graph holds the activations autograd saved until its backward: all kept graphs
    together stay within `max_kept_bytes` (the oldest go first), a graph bigger than the bound is not kept, and every
    backward is still answered (running the blocks again when its graph is gone)."""
    from swarm.transport.messages import Backward, BackwardReply, Forward, ForwardReply

    hidden, grad = torch.randn(1, 6, 64), torch.randn(1, 6, 64)
    probe = start_server(tiny_llama, (0, 3))
    with RpcClient(probe.endpoint) as client:
        kept = ForwardReply.from_wire(client.call(*Forward(hidden, keep=True).to_wire())).kept
        one = probe.handler.info()["kept_bytes"]
        want = BackwardReply.from_wire(client.call(*Backward(hidden, grad, kept=kept).to_wire())).grad_input
    assert one > 0
    server = start_server(tiny_llama, (0, 3), limits=HandlerLimits(max_kept_bytes=int(one * 2.5)))
    with RpcClient(server.endpoint) as client:
        ids = [ForwardReply.from_wire(client.call(*Forward(hidden, keep=True).to_wire())).kept for _ in range(4)]
        info = server.handler.info()
        assert all(isinstance(i, str) for i in ids) and info["kept_graphs"] == 2 and info["kept_bytes"] == 2 * one
        for kid in ids:  # the two oldest were dropped: their backward runs the blocks again, with the same result
            got = BackwardReply.from_wire(client.call(*Backward(hidden, grad, kept=kid).to_wire())).grad_input
            assert torch.equal(got, want)
        bigger = torch.randn(4, 6, 64)  # four times the activations: more than the bound, so not kept at all
        reply = ForwardReply.from_wire(client.call(*Forward(bigger, keep=True).to_wire()))
        assert reply.kept is None and server.handler.info()["kept_graphs"] == 0
