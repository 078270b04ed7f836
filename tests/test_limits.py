"""Limits per peer: a greedy peer gets a clear refusal (a typed error with a stable code) past each of its limits, and
another client (another connection: on loopback each connection is a peer of its own) keeps being served exactly.

Then what no single request shows: hundreds of connections at once, and a peer that never reads its replies, against
a live server whose memory is measured.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import zmq

from swarm.core.client.model import AutoDistributedModelForCausalLM
from swarm.core.server.backend import BlockSpan
from swarm.core.server.cache import CacheBudget
from swarm.core.server.engine import Engine, QueueLimits
from swarm.core.server.handler import Handler, HandlerLimits
from swarm.core.weights import ModelSource
from swarm.transport.codec import Message, decode, encode
from swarm.transport.errors import CacheFull, ServerBusy, SwarmError
from swarm.transport.keys import SwarmKey
from swarm.transport.messages import LoraWeights, Open
from swarm.transport.rpc import CurveClient, Request, RpcClient, RpcClientConfig, RpcServerConfig

SPAN = (0, 3)  # a server of the first blocks only: its output is a hidden state of the reference, before the norm
ATOL = 1e-5
TIMEOUT = RpcClientConfig(timeout=20.0)


@pytest.fixture(scope="module")
def states(tiny_llama_ref):
    """Inputs and outputs of blocks 0:3 of the reference, for a few sequences."""
    ids = torch.randint(0, tiny_llama_ref.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hidden = tiny_llama_ref(ids, output_hidden_states=True).hidden_states
    return hidden[0], hidden[SPAN[1]]


def open_session(client: RpcClient, batch: int = 1, max_length: int = 8, **fields) -> str:
    return client.call("open", {"batch_size": batch, "max_length": max_length, **fields}).fields["session"]


def assert_served(client: RpcClient, states) -> None:
    """A session of `client` steps through the reference exactly (its prompt, then one token at a time)."""
    inputs, expected = states
    session = open_session(client, batch=2, max_length=6)
    outs = [client.call("step", {"session": session, "names": ["hidden"]}, [x]).tensors[0]
            for x in (inputs[:, :3], inputs[:, 3:4], inputs[:, 4:])]
    torch.testing.assert_close(torch.cat(outs, dim=1), expected, atol=ATOL, rtol=0)
    client.call("close", {"session": session})


def refused(exc_type, code: str, call) -> Exception:
    with pytest.raises(exc_type) as info:
        call()
    assert type(info.value) is exc_type and info.value.code == code, info.value
    return info.value


# --- each limit per peer ----------------------------------------------------------------------------------------


def test_open_sessions_per_peer(tiny_llama, start_server, states):
    server = start_server(tiny_llama, SPAN, limits=HandlerLimits(max_peer_sessions=3))
    with RpcClient(server.endpoint, TIMEOUT) as greedy, RpcClient(server.endpoint, TIMEOUT) as other:
        assert greedy.call("info").fields["peer_limits"]["sessions"] == 3
        mine = [open_session(greedy) for _ in range(3)]
        error = refused(ServerBusy, "busy", lambda: open_session(greedy))
        assert "max_peer_sessions" in error.remote_message and len(server.handler.sessions) == 3
        assert_served(other, states)  # its own sessions: untouched by the greedy peer's count
        greedy.call("close", {"session": mine[0]})
        open_session(greedy)  # room again once it closed one


def test_cache_tokens_per_peer(tiny_llama, start_server, states):
    limits = HandlerLimits(peer_share=0.5, peer_cache_tokens=100)
    server = start_server(tiny_llama, SPAN, cache_tokens=1000, limits=limits)
    with RpcClient(server.endpoint, TIMEOUT) as greedy, RpcClient(server.endpoint, TIMEOUT) as other:
        assert greedy.call("info").fields["peer_limits"]["cache_tokens"] == 500
        open_session(greedy, batch=4, max_length=100)
        error = refused(CacheFull, "cache_full", lambda: open_session(greedy, batch=2, max_length=60))
        assert "one peer may hold 500" in error.remote_message
        assert greedy.call("info").fields["cache_tokens_free"] == 600  # the refusal reserved nothing
        open_session(greedy, batch=1, max_length=100)  # up to its share exactly
        assert_served(other, states)
        open_session(other, batch=5, max_length=100)  # the other peer has a share of its own


def test_a_peer_may_always_hold_its_floor_of_a_small_budget(tiny_llama, start_server):
    """On a small server one peer may take the whole budget (`peer_cache_tokens`): an honest client is not refused
    a long session because of the share."""
    server = start_server(tiny_llama, SPAN, cache_tokens=2000)  # the defaults: share 0.5, floor 4096
    with RpcClient(server.endpoint, TIMEOUT) as client:
        open_session(client, batch=1, max_length=1500)
        open_session(client, batch=1, max_length=500)
        assert client.call("info").fields["cache_tokens_free"] == 0


def test_loras_kept_with_sessions_per_peer(tiny_llama, start_server):
    q = "self_attn.q_proj"
    lora = LoraWeights(2.0, {q: torch.zeros(3, 4, 64)}, {q: torch.zeros(3, 64, 4)})
    limits = HandlerLimits(max_session_lora_bytes=4 * lora.nbytes, max_lora_bytes=lora.nbytes, peer_share=0.5)
    server = start_server(tiny_llama, SPAN, limits=limits)
    with RpcClient(server.endpoint, TIMEOUT) as greedy, RpcClient(server.endpoint, TIMEOUT) as other:
        assert greedy.call("info").fields["peer_limits"]["session_lora_bytes"] == 2 * lora.nbytes
        request = Open(8, lora=lora).to_wire()
        for _ in range(2):
            greedy.call(*request)
        error = refused(ServerBusy, "busy", lambda: greedy.call(*request))
        assert "one peer may keep" in error.remote_message
        open_session(greedy)  # without a LoRA it is served as before
        for _ in range(2):
            other.call(*request)  # the other peer's LoRAs have room of their own
        assert sum(s.lora_bytes for s in server.handler.sessions.values()) == 4 * lora.nbytes


class _Frame:
    """A received frame as ZeroMQ describes it: the address of the connection it came on."""

    def __init__(self, address: str):
        self.address = address

    def get(self, prop: str) -> str | None:
        return self.address if prop == "Peer-Address" else None


class _Socket:
    """What a Request answers through: keeps the replies."""

    config = RpcServerConfig()

    def __init__(self) -> None:
        self.replies: list[tuple[bytes, Message]] = []

    def send(self, identity: bytes, frames: list, peer: str | None = None) -> None:
        self.replies.append((identity, decode([bytes(f) for f in frames])))

    def answered(self, msg_type: str, code: str | None, received: float) -> None:
        """What an RpcServer counts (nothing here)."""


def test_queued_requests_are_bounded_per_peer_not_per_connection(tiny_llama):
    """Two connections from one remote address are one peer: they share its part of the queue; a third connection
    from another address has its own."""
    span = BlockSpan.load(ModelSource(str(tiny_llama)), *SPAN, dtype=torch.float32)
    engine = Engine(span, queue=QueueLimits(max_items=8, client_share=0.5))  # not started: what is queued stays
    handler = Handler(span, engine, CacheBudget(100), "m")
    socket = _Socket()
    hidden = torch.zeros(1, 2, 64)

    def forward(connection: bytes, address: str, request_id: int) -> None:
        message = decode(encode("forward", request_id, {"names": ["hidden"]}, [hidden]))
        request = Request(socket, connection, message, _Frame(address))
        try:
            handler(request)
        except SwarmError as e:  # what the I/O loop turns into an error reply
            request.fail(e.code, str(e))

    try:
        for i in range(6):  # one peer on two connections
            forward(b"conn-%d" % (i % 2), "10.0.0.1", i + 1)
        forward(b"conn-2", "10.0.0.2", 7)
        assert engine.pending == 5  # 4 of the first peer (half of 8), 1 of the other
        assert [(m.id, m.fields["code"]) for _, m in socket.replies] == [(5, "busy"), (6, "busy")]
        assert "one peer may have 4" in socket.replies[0][1].fields["message"]
        assert {job.client for job in engine._jobs.values()} == {"ip:10.0.0.1", "ip:10.0.0.2"}
    finally:
        engine.stop(timeout=0)


def test_kept_graphs_of_a_greedy_peer_evict_its_own(tiny_llama, start_server):
    """Kept forward graphs are bounded in count and bytes: past the bounds the biggest holder's oldest graph goes, so
    the other peer's graph stays and serves its backward."""
    server = start_server(tiny_llama, SPAN, limits=HandlerLimits(max_kept=4))
    small, big, grad = torch.randn(1, 3, 64), torch.randn(4, 16, 64), torch.randn(1, 3, 64)

    def keep(client: RpcClient, x: torch.Tensor) -> str:
        return client.call("forward", {"names": ["hidden"], "keep": True}, [x]).fields["kept"]

    def backward(client: RpcClient, kept: str | None = None) -> list[torch.Tensor]:
        fields = {"names": ["hidden", "grad_output"], **({"kept": kept} if kept else {})}
        return client.call("backward", fields, [small, grad]).tensors

    with RpcClient(server.endpoint, TIMEOUT) as greedy, RpcClient(server.endpoint, TIMEOUT) as other:
        mine = keep(other, small)
        greedy_ids = [keep(greedy, big) for _ in range(6)]  # past the count: its own go
        kept = server.handler._kept
        assert len(kept) == 4 and mine in kept and greedy_ids[0] not in kept and greedy_ids[-1] in kept
        # past the bytes: a bound of three big graphs and the small one
        size = kept[greedy_ids[-1]].nbytes
        server.handler.limits = HandlerLimits(max_kept=4, max_kept_bytes=3 * size + kept[mine].nbytes)
        keep(greedy, big)
        assert len(kept) == 4 and mine in kept
        server.handler.limits = HandlerLimits(max_kept=4, max_kept_bytes=2 * size + kept[mine].nbytes)
        keep(greedy, big)
        assert len(kept) == 3 and mine in kept
        recomputed = backward(other)
        from_graph = backward(other, mine)
        assert mine not in kept  # used
        assert all(torch.equal(a, b) for a, b in zip(recomputed, from_graph, strict=True))


def test_a_greedy_peer_at_its_limits_does_not_change_another_clients_generation(tiny_llama, tiny_llama_ref,
                                                                                  start_server, tmp_path):
    """A peer holding all the sessions and cache tokens it may, with its queue share full: a model client still
    generates exactly the reference's greedy tokens."""
    limits = HandlerLimits(max_peer_sessions=3, peer_cache_tokens=0)
    server = start_server(tiny_llama, (0, 6), cache_tokens=4096, limits=limits,
                          queue=QueueLimits(max_items=16, client_share=0.5))
    ids = torch.tensor([[5, 9, 17, 3]])
    expected = tiny_llama_ref.generate(ids, max_new_tokens=10, do_sample=False)
    with RpcClient(server.endpoint, TIMEOUT) as greedy:
        sessions = [open_session(greedy, batch=1, max_length=1024), open_session(greedy, batch=1, max_length=1023)]
        refused(CacheFull, "cache_full", lambda: open_session(greedy, batch=1, max_length=2))  # 2049 of 4096
        open_session(greedy, batch=1, max_length=1)
        refused(ServerBusy, "busy", lambda: open_session(greedy, batch=1, max_length=1))  # a 4th session
        one = torch.zeros(1, 1, 64)
        for i in range(40):  # raw: another connection, so another peer of its own on loopback
            greedy.send_raw(encode("step", i + 1, {"session": sessions[i % 2], "names": ["hidden"]}, [one]))
        model = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_llama), initial_peers=[server.endpoint])
        try:
            got = model.generate(ids, max_new_tokens=10, do_sample=False)
        finally:
            model.close()
        assert torch.equal(got, expected)
        replies = _drain(greedy, 40)
        assert len(replies) == 40 and any(r.fields.get("code") == "busy" for r in replies)


def _drain(client: RpcClient, count: int, timeout: float = 30.0) -> list[Message]:
    replies, deadline = [], time.monotonic() + timeout
    while len(replies) < count and time.monotonic() < deadline:
        frames = client.recv_raw(timeout=max(0.01, deadline - time.monotonic()))
        if frames is None:
            break
        replies.append(decode(frames))
    return replies


def test_in_a_private_swarm_a_member_key_is_one_peer_and_the_swarm_key_is_no_one(tiny_llama, start_server, tmp_path):
    """Two connections with one member key share its limits; the swarm key itself, which many members may hold,
    names no one (each loopback connection is then a peer of its own, as in an open swarm)."""
    key = SwarmKey.generate()
    key.write(tmp_path / "swarm.key")
    alice = key.member()
    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed" / "alice.key.pub").write_bytes(alice.write(tmp_path / "alice.key").read_bytes())
    server = start_server(tiny_llama, SPAN, swarm_key=str(tmp_path / "swarm.key"),
                          allowed_keys=str(tmp_path / "allowed"), limits=HandlerLimits(max_peer_sessions=2))

    def connect(k: SwarmKey) -> RpcClient:
        return RpcClient(server.endpoint, RpcClientConfig(timeout=20.0, curve=CurveClient.of(k)))

    with connect(alice) as a1, connect(alice) as a2, connect(key) as s1, connect(key) as s2:
        open_session(a1)
        open_session(a2)
        refused(ServerBusy, "busy", lambda: open_session(a1))
        refused(ServerBusy, "busy", lambda: open_session(a2))  # another connection, the same member
        for client in (s1, s2):
            open_session(client)
            open_session(client)
        refused(ServerBusy, "busy", lambda: open_session(s1))
        assert {s.peer for s in server.handler.sessions.values()} == {f"key:{alice.public.decode()}",
                                                                      *(f"conn:{c}" for c in _conns(server, 2))}


def _conns(server, count: int) -> list[str]:
    """The connection ids (hex) of the sessions not opened by a key."""
    sessions = server.handler.sessions.values()
    conns = sorted({s.peer.removeprefix("conn:") for s in sessions if s.peer.startswith("conn:")})
    assert len(conns) == count
    return conns


# --- connection floods and slow readers -----------------------------------------------------------------------


def _rss(pid: int) -> int:
    """Resident memory of process `pid`, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_flood_of_connections_neither_grows_memory_nor_stops_a_client(tiny_llama, fork_serve, states):
    server = fork_serve(str(tiny_llama), "--blocks", "0:3", "--host", "127.0.0.1")
    pid = server.proc.pid
    with RpcClient(server.endpoint, TIMEOUT) as client:
        assert_served(client, states)  # warm: what a first request allocates is not the flood's
        before = _rss(pid)
        context = zmq.Context()
        try:
            for _ in range(2):  # twice: what the first flood allocated is reused by the second
                socks = []
                for i in range(400):  # each connects and sends one request (a small forward), never reads
                    sock = context.socket(zmq.DEALER)
                    sock.setsockopt(zmq.LINGER, 0)
                    sock.connect(server.endpoint)
                    sock.send_multipart(encode("forward", i + 1, {"names": ["hidden"]}, [torch.zeros(1, 16, 64)]))
                    socks.append(sock)
                started = time.monotonic()
                assert_served(client, states)  # while they all wait
                assert time.monotonic() - started < 10
                for sock in socks:
                    sock.close(linger=0)
                during = _rss(pid)
            deadline = time.monotonic() + 10
            while client.call("info").fields["queue"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.call("info").fields["queue"] == 0
            assert_served(client, states)
            after = _rss(pid)
        finally:
            context.term()
    grown = (max(during, after) - before) >> 20
    print(f"server RSS before {before >> 20} MiB, during {during >> 20} MiB, after {after >> 20} MiB")
    assert grown < 200, f"the server grew by {grown} MiB for 800 connections"


def test_a_peer_that_never_reads_its_replies_holds_a_bounded_amount(tiny_llama, start_server, states):
    server = start_server(tiny_llama, SPAN, unread_bytes=4 << 20)
    rpc = server._rpc
    context = zmq.Context()
    slow = context.socket(zmq.DEALER)
    slow.setsockopt(zmq.LINGER, 0)
    slow.setsockopt(zmq.RCVHWM, 1)  # it reads nothing: ZeroMQ on its side takes little, the kernel a little more
    slow.setsockopt(zmq.RCVBUF, 64 << 10)
    slow.connect(server.endpoint)
    try:
        with RpcClient(server.endpoint, TIMEOUT) as client:
            block = torch.zeros(64, 64, 64)  # a reply of 1 MiB
            for i in range(40):
                slow.send_multipart(encode("forward", i + 1, {"names": ["hidden"]}, [block]))
            deadline = time.monotonic() + 20
            while (rpc.dropped_replies < 20 or server.handler.engine.pending) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert_served(client, states)  # the other peer's replies are not held back
            sent = rpc.dropped_replies  # (all 40 are answered by now: the engine ran them before the client's steps)
            assert sent >= 20  # the kernel and ZeroMQ took some, the rest were dropped
            assert rpc.unread_bytes <= 4 << 20
            received = 0
            while slow.poll(2000) and received < 40:  # reading again: the replies it was sent come, whole
                message = decode(slow.recv_multipart())
                assert message.type == "result" and message.tensors[0].shape == block.shape
                received += 1
            assert received == 40 - sent  # all but those dropped, and only those, were left for it
            assert rpc.unread_bytes == 0
    finally:
        slow.close(linger=0)
        context.term()


def test_unread_replies_of_a_peer_that_leaves_are_forgotten(tiny_llama, start_server):
    server = start_server(tiny_llama, SPAN, unread_bytes=64 << 20)
    rpc = server._rpc
    context = zmq.Context()
    try:
        slow = context.socket(zmq.DEALER)
        slow.setsockopt(zmq.LINGER, 0)
        slow.setsockopt(zmq.RCVHWM, 1)
        slow.setsockopt(zmq.RCVBUF, 64 << 10)
        slow.connect(server.endpoint)
        for i in range(20):
            slow.send_multipart(encode("forward", i + 1, {"names": ["hidden"]}, [torch.zeros(64, 64, 64)]))
        deadline = time.monotonic() + 20
        while (server.handler.engine.pending or rpc.unread_bytes < 4 << 20) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rpc.unread_bytes >= 4 << 20  # held for it, within the bound
        slow.close(linger=0)
        deadline = time.monotonic() + 10
        while rpc.unread_bytes and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rpc.unread_bytes == 0 and not rpc._unread
    finally:
        context.term()
