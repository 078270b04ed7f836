"""RpcClient against real ZeroMQ sockets on 127.0.0.1: several calls in flight to one peer, each with its own timeout,
and every way a call can end (reply, timeout, lost peer, close, malformed reply) reaching exactly the calls concerned.

The servers answer from other threads after a delay, as a real server does with compute. Every wait is bounded."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import msgpack
import pytest
import zmq

from swarm.transport.codec import PROTOCOL_VERSION, decode, encode
from swarm.transport.errors import PeerTimeout, PeerUnreachable, ProtocolError, UnknownSession
from swarm.transport.rpc import Request, RpcClient, RpcClientConfig, RpcServer, RpcServerConfig

WAIT = 10.0  # seconds: the bound of every wait in this file that should end much sooner


class SlowServer:
    """An RpcServer whose handler answers each request after `fields["delay"]` seconds, from a timer thread.

    `hold` > 0 keeps every answer back until that many requests are in at once (bounded by WAIT), which proves
    that they were in flight together. A request with `"never": True` is never answered.
    """

    def __init__(self, hold: int = 0):
        self.hold = hold
        self.lock = threading.Lock()
        self.received: list[int] = []
        self.together = 0  # most requests received and not yet answered
        self.waiting = 0
        self.all_in = threading.Event()
        self.answered: dict[int, threading.Event] = {}
        self.timers: list[threading.Timer] = []
        self.server = RpcServer(self.handle, RpcServerConfig(host="127.0.0.1", port=0, poll_ms=20))

    def handle(self, req: Request) -> None:
        n = req.message.get("n")
        with self.lock:
            self.received.append(n)
            self.answered.setdefault(n, threading.Event())
            if req.message.get("never"):
                return
            self.waiting += 1
            self.together = max(self.together, self.waiting)
            if self.waiting >= self.hold:
                self.all_in.set()
        timer = threading.Timer(0, self._answer, (req, float(req.message.get("delay", 0.0))))
        timer.daemon = True
        self.timers.append(timer)
        timer.start()

    def _answer(self, req: Request, delay: float) -> None:
        if self.hold:
            self.all_in.wait(WAIT)
        time.sleep(delay)  # the "compute" of this request
        with self.lock:
            self.waiting -= 1
        n = req.message.get("n")
        if req.message.get("fail"):
            req.fail("unknown_session", f"no session {n}")
        else:
            req.reply({"n": n})
        self.answered[n].set()

    def wait_received(self, count: int) -> bool:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.received) >= count:
                    return True
            time.sleep(0.005)
        return False


@contextmanager
def slow_server(hold: int = 0) -> Iterator[SlowServer]:
    server = SlowServer(hold)
    server.server.start()
    try:
        yield server
    finally:
        server.server.stop()
        for timer in server.timers:
            timer.join(WAIT)


def in_threads(calls: list[Callable[[], Any]]) -> list[tuple[str, Any, float]]:
    """Run `calls` at once (a barrier lines them up); each gives ("ok", result, seconds) or ("error", exc, seconds)."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], Any]) -> tuple[str, Any, float]:
        barrier.wait(WAIT)
        started = time.monotonic()
        try:
            return "ok", call(), time.monotonic() - started
        except Exception as e:
            return "error", e, time.monotonic() - started

    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(run, call) for call in calls]
        return [f.result(timeout=3 * WAIT) for f in futures]


def client_threads(endpoint: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"swarm-rpc-client {endpoint}"]


# --- several calls in flight ----------------------------------------------------------------------------------------


def test_concurrent_calls_to_one_peer_are_in_flight_together():
    count, delay = 8, 0.5
    with slow_server(hold=count) as peer, RpcClient(peer.server.endpoint) as client:
        started = time.monotonic()
        results = in_threads([lambda n=n: client.call("work", {"n": n, "delay": delay}, timeout=WAIT)
                              for n in range(count)])
        elapsed = time.monotonic() - started
    assert [(kind, reply.get("n")) for kind, reply, _ in results] == [("ok", n) for n in range(count)]
    assert peer.together == count  # the server held all of them at once: none waited for another's reply
    assert elapsed < count * delay / 2, f"{count} calls of {delay} s took {elapsed:.2f} s: they did not overlap"


def test_simulated_link_delay_overlaps_between_concurrent_calls():
    count, delay = 4, 0.3  # each call: 0.3 s before sending and 0.3 s after its reply
    with slow_server() as peer, RpcClient(peer.server.endpoint, RpcClientConfig(link_delay=delay)) as client:
        started = time.monotonic()
        results = in_threads([lambda n=n: client.call("work", {"n": n}, timeout=WAIT) for n in range(count)])
        elapsed = time.monotonic() - started
    assert all(kind == "ok" and seconds >= 2 * delay for kind, _, seconds in results)
    assert elapsed < count * 2 * delay * 0.65, f"{elapsed:.2f} s: the link delays did not overlap"


def test_one_call_times_out_while_the_others_get_their_replies():
    with slow_server() as peer, RpcClient(peer.server.endpoint) as client:
        calls = [lambda n=n: client.call("work", {"n": n, "delay": 1.0}, timeout=WAIT) for n in range(4)]
        calls.append(lambda: client.call("work", {"n": 99, "delay": 2.0}, timeout=0.3))
        results = in_threads(calls)
        kind, error, seconds = results[-1]
        assert kind == "error" and isinstance(error, PeerTimeout) and seconds < 0.3 + 2.0
        assert [(kind, reply.get("n")) for kind, reply, _ in results[:-1]] == [("ok", n) for n in range(4)]
        # the late reply of the call that timed out comes and is dropped: the next call gets its own
        assert peer.answered[99].wait(WAIT)
        assert client.call("work", {"n": 5}, timeout=WAIT).get("n") == 5


def test_a_lone_timeout_starts_afresh_and_its_late_reply_is_dropped():
    with slow_server() as peer, RpcClient(peer.server.endpoint) as client:
        with pytest.raises(PeerTimeout):
            client.call("work", {"n": 1, "delay": 0.5}, timeout=0.05)
        assert peer.answered[1].wait(WAIT)
        assert client.call("work", {"n": 2}, timeout=WAIT).get("n") == 2
        assert [client.call("work", {"n": n}, timeout=WAIT).get("n") for n in range(3, 6)] == [3, 4, 5]


def test_error_replies_raise_their_typed_error_among_good_replies():
    with slow_server() as peer, RpcClient(peer.server.endpoint) as client:
        results = in_threads([lambda n=n: client.call("work", {"n": n, "delay": 0.2, "fail": n % 2}, timeout=WAIT)
                              for n in range(4)])
    assert [kind for kind, _, _ in results] == ["ok", "error", "ok", "error"]
    assert all(isinstance(results[n][1], UnknownSession) for n in (1, 3))
    assert [results[n][1].get("n") for n in (0, 2)] == [0, 2]


# --- calls that end without a reply ---------------------------------------------------------------------------------


def test_a_peer_that_dies_fails_every_call_in_flight_with_peer_unreachable():
    with slow_server() as peer, RpcClient(peer.server.endpoint) as client:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(client.call, "work", {"n": n, "never": True}, timeout=30) for n in range(4)]
            assert peer.wait_received(4)
            stopped = time.monotonic()
            peer.server.stop()
            for future in futures:
                with pytest.raises(PeerUnreachable, match="closed the connection"):
                    future.result(timeout=WAIT)
            assert time.monotonic() - stopped < 5.0
        with pytest.raises(PeerUnreachable):  # nothing listens there any more: refused, long before the timeout
            client.call("work", {"n": 9}, timeout=30)


def test_a_peer_that_refuses_the_connection_fails_the_call_quickly():
    with slow_server() as peer:
        endpoint = peer.server.endpoint
    with RpcClient(endpoint) as client:
        started = time.monotonic()
        with pytest.raises(PeerUnreachable, match="refused"):
            client.call("ping", timeout=30)
        assert time.monotonic() - started < 5.0


def test_close_fails_the_waiting_calls_at_once_and_stops_the_thread():
    with slow_server() as peer:
        client = RpcClient(peer.server.endpoint)
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(client.call, "work", {"n": n, "never": True}, timeout=30) for n in range(3)]
            assert peer.wait_received(3)
            threads = client_threads(client.endpoint)
            assert len(threads) == 1 and threads[0].daemon
            started = time.monotonic()
            client.close()
            for future in futures:
                with pytest.raises(PeerUnreachable, match="closed"):
                    future.result(timeout=WAIT)
            assert time.monotonic() - started < 2.0
        threads[0].join(WAIT)
        assert not threads[0].is_alive()
        with pytest.raises(PeerUnreachable):
            client.call("work", {"n": 4})
        client.close()  # twice is fine


def test_a_client_dropped_without_close_ends_its_thread():
    with slow_server() as peer:
        client = RpcClient(peer.server.endpoint)
        assert client.call("work", {"n": 1}, timeout=WAIT).get("n") == 1
        (thread,) = client_threads(peer.server.endpoint)
        del client
        gc.collect()
        thread.join(WAIT)
        assert not thread.is_alive()


def test_addresses_zeromq_refuses_raise_peer_unreachable():
    for address in ("tcp://a b:9", "tcp://*:1", "tcp://a..b:9"):
        with pytest.raises(PeerUnreachable, match="bad peer address"):
            RpcClient(address)
    ctx = zmq.Context()
    ctx.term()  # any ZMQError while connecting, here a context already gone, comes out as PeerUnreachable
    client = RpcClient("tcp://127.0.0.1:9", context=ctx)
    try:
        with pytest.raises(PeerUnreachable):
            client.call("ping", timeout=WAIT)
        with pytest.raises(PeerUnreachable):
            client.send_raw([b"x"])
    finally:
        client.close()


# --- malformed replies ----------------------------------------------------------------------------------------------


class FakePeer:
    """A bare ROUTER that answers each request by `fields["answer"]`: "echo", "garbage" (no msgpack at all), "short"
    (declares a tensor it does not send) or "wait" (kept until an "echo" arrives, then answered as garbage)."""

    def __init__(self):
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://127.0.0.1:{self.router.bind_to_random_port('tcp://127.0.0.1')}"
        self.stop = threading.Event()
        self.held: list[bytes] = []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.router.poll(20):
                continue
            identity, *frames = self.router.recv_multipart()
            msg = decode(frames)
            answer = msg.get("answer")
            if answer == "wait":
                self.held.append(identity)
            elif answer == "garbage":
                for held in [*self.held, identity]:
                    self.router.send_multipart([held, b"\xc1 not msgpack"])
                self.held.clear()
            elif answer == "short":
                header = {"v": PROTOCOL_VERSION, "type": "result", "id": msg.id, "tensors": [["float32", [2]]]}
                self.router.send_multipart([identity, msgpack.packb(header)])
            else:
                self.router.send_multipart([identity, *encode("result", msg.id, {"n": msg.get("n")})])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(WAIT)
        self.router.close(linger=0)
        self.ctx.term()


@pytest.fixture
def fake_peer() -> Iterator[FakePeer]:
    peer = FakePeer()
    try:
        yield peer
    finally:
        peer.close()


def test_a_malformed_reply_fails_its_own_call_with_protocol_error(fake_peer):
    with RpcClient(fake_peer.endpoint) as client:
        with pytest.raises(ProtocolError, match="malformed reply"):
            client.call("x", {"answer": "short"}, timeout=WAIT)
        assert client.call("x", {"answer": "echo", "n": 3}, timeout=WAIT).get("n") == 3


def test_an_unreadable_reply_fails_the_calls_in_flight_with_protocol_error(fake_peer):
    with RpcClient(fake_peer.endpoint) as client, ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(client.call, "x", {"answer": "wait"}, timeout=WAIT) for _ in range(2)]
        deadline = time.monotonic() + WAIT
        while len(fake_peer.held) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        with pytest.raises(ProtocolError):
            client.call("x", {"answer": "garbage"}, timeout=WAIT)
        for future in waiting:
            with pytest.raises(ProtocolError, match="malformed reply"):
                future.result(timeout=WAIT)
        assert client.call("x", {"answer": "echo", "n": 4}, timeout=WAIT).get("n") == 4
