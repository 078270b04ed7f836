"""ZeroMQ request/reply: a ROUTER server with a non-blocking I/O loop, and a DEALER client with timeouts.

`RpcServer` owns one ROUTER socket in its own I/O thread. Every decoded request goes to a handler callback that must
not block (it answers cheap requests at once and queues compute elsewhere); anyone may answer later from any thread
with `Request.reply` / `Request.fail`. Replies travel to the I/O thread over an inproc socket, so the socket loop
never waits on compute. A malformed message gets an error reply and never stops the loop.

`RpcClient` talks to one peer through a DEALER socket: one request, exactly one reply matched by request id, every
wait bounded. After a timeout the socket is replaced, so a request that never left is not delivered late.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from .codec import Message, decode, decode_header, encode
from .errors import ConfigError, PeerTimeout, PeerUnreachable, ProtocolError, SwarmError, error_for_code

log = logging.getLogger(__name__)

ERROR = "error"  # message type of an error reply
RESULT = "result"  # message type of a successful reply
_LOST_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
# why a bind failed, in words a user can act on (ZeroMQ reports a host it cannot parse as "no such device")
_BIND_ERRORS = {errno.EADDRINUSE: "address in use (another process listens on that port)",
                errno.EADDRNOTAVAIL: "not an address of this machine",
                errno.ENODEV: "no such address or interface on this machine",
                errno.EACCES: "permission denied (ports below 1024 need privileges)"}


def normalize_endpoint(address: str) -> str:
    """`tcp://host:port` from `tcp://host:port` or `host:port`; raises PeerUnreachable when malformed."""
    text = address.strip()
    if "://" not in text:
        text = "tcp://" + text
    scheme, _, rest = text.partition("://")
    host, sep, port = rest.rpartition(":")
    if scheme != "tcp" or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PeerUnreachable(f"bad peer address {address!r}: expected tcp://HOST:PORT")
    return f"tcp://{host}:{int(port)}"


@dataclass(frozen=True)
class RpcServerConfig:
    host: str = "0.0.0.0"  # interface to bind; 0.0.0.0 binds all
    port: int = 0  # 0 picks any free port (see RpcServer.endpoint)
    poll_ms: int = 100  # how often the I/O loop wakes to run its tick callback and check for stop
    high_water_mark: int = 10_000  # queued messages per peer before ZeroMQ drops


class Request:
    """One request received by the server; answer it exactly once with `reply` or `fail` (from any thread)."""

    __slots__ = ("_server", "_identity", "message", "_answered", "_lock")

    def __init__(self, server: RpcServer, identity: bytes, message: Message):
        self._server = server
        self._identity = identity
        self.message = message
        self._answered = False
        self._lock = threading.Lock()

    @property
    def client(self) -> bytes:
        """The ZeroMQ identity of the requesting connection."""
        return self._identity

    def _claim(self) -> bool:
        with self._lock:
            if self._answered:
                return False
            self._answered = True
            return True

    def reply(self, fields: dict[str, Any] | None = None, tensors: Sequence[torch.Tensor] = ()) -> None:
        if self._claim():
            self._server.send(self._identity, encode(RESULT, self.message.id, fields, tensors))

    def fail(self, code: str, message: str) -> None:
        if self._claim():
            self._server.send(self._identity, encode(ERROR, self.message.id, {"code": code, "message": message}))


class RpcServer:
    """A ROUTER socket served by one I/O thread; `handler(request)` is called there for each decoded request."""

    def __init__(self, handler: Callable[[Request], None], config: RpcServerConfig | None = None,
                 tick: Callable[[], None] | None = None, context: zmq.Context | None = None):
        self.config = config or RpcServerConfig()
        self._handler = handler
        self._tick = tick
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.SNDHWM, self.config.high_water_mark)
        self._router.setsockopt(zmq.RCVHWM, self.config.high_water_mark)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        try:
            if self.config.port:
                self._router.bind(f"tcp://{self.config.host}:{self.config.port}")
                self.port = self.config.port
            else:
                self.port = self._router.bind_to_random_port(f"tcp://{self.config.host}")
        except zmq.ZMQError as e:
            self._router.close(linger=0)
            if self._own_context:
                self._ctx.term()
            address = f"tcp://{self.config.host}:{self.config.port or '*'}"
            raise ConfigError(f"cannot listen on {address}: {_BIND_ERRORS.get(e.errno, e.strerror)}") from None
        inproc = f"inproc://swarm-replies-{id(self)}"
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(inproc)
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.connect(inproc)
        self._push_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="swarm-rpc-io", daemon=True)
        self._warned: set[str] = set()

    @property
    def endpoint(self) -> str:
        """The address clients connect to (a wildcard host is given as 127.0.0.1)."""
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "*") else self.config.host
        return f"tcp://{host}:{self.port}"

    def start(self) -> RpcServer:
        self._thread.start()
        return self

    def send(self, identity: bytes, frames: list[Any]) -> None:
        """Queue a reply for the I/O thread (thread-safe)."""
        if self._stop.is_set():
            return
        with self._push_lock:
            self._push.send_multipart([identity, *frames], copy=False)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._push_lock:
            for sock in (self._router, self._pull, self._push):
                sock.close(linger=0)
        if self._own_context:
            self._ctx.term()

    def __enter__(self) -> RpcServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._pull, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                events = dict(poller.poll(self.config.poll_ms))
                if self._pull in events:
                    self._flush_replies()
                if self._router in events:
                    self._receive()
                if self._tick is not None:
                    self._tick()
            except zmq.ContextTerminated:
                return
            except Exception:  # the loop must outlive any single bad message or handler bug
                log.exception("unexpected error in the server I/O loop")

    def _flush_replies(self) -> None:
        for _ in range(1000):
            try:
                frames = self._pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._router.send_multipart(frames, copy=False)

    def _receive(self) -> None:
        for _ in range(1000):
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity, body = frames[0].bytes, frames[1:]
            try:
                message = decode(body)
            except ProtocolError as e:
                self._reject(identity, body, e)
                continue
            try:
                self._handler(Request(self, identity, message))
            except SwarmError as e:
                self._router.send_multipart([identity, *encode(ERROR, message.id, {"code": e.code,
                                                                                   "message": str(e)})])
            except Exception as e:
                log.exception("handler failed on %s", message.type)
                self._router.send_multipart([identity, *encode(ERROR, message.id, {"code": "internal",
                                                                                   "message": repr(e)})])

    def _reject(self, identity: bytes, body: list[Any], error: ProtocolError) -> None:
        request_id = 0
        try:  # answer under the request id when the header at least parses
            request_id = decode_header(body[0])["id"] if body else 0
        except ProtocolError:
            pass
        if error.code not in self._warned:
            self._warned.add(error.code)
            log.warning("malformed message from a peer: %s", error)
        else:
            log.debug("malformed message from a peer: %s", error)
        self._router.send_multipart([identity, *encode(ERROR, request_id, {"code": error.code,
                                                                          "message": str(error)})])


@dataclass(frozen=True)
class RpcClientConfig:
    timeout: float = 30.0  # seconds to wait for a reply unless a call says otherwise
    connect_timeout: float = 5.0  # seconds for the first reply from a peer (used by callers that probe peers)
    link_delay: float = 0.0  # simulated one-way latency added to each request and each reply (benchmarks)
    link_bandwidth: float | None = None  # simulated link speed in bytes/s (None: as fast as loopback)

    def link_time(self, frames: Sequence[Any]) -> float:
        """Seconds a message of `frames` spends on the simulated link."""
        if self.link_bandwidth is None:
            return self.link_delay
        size = sum(len(f.buffer) if hasattr(f, "buffer") else len(f) for f in frames)
        return self.link_delay + size / self.link_bandwidth


class RpcClient:
    """A connection to one peer. `call` is thread-safe (calls to one peer are serialized)."""

    _ids = itertools.count(1)

    def __init__(self, endpoint: str, config: RpcClientConfig | None = None, context: zmq.Context | None = None):
        self.endpoint = normalize_endpoint(endpoint)
        self.config = config or RpcClientConfig()
        self._ctx = context or zmq.Context.instance()
        self._lock = threading.Lock()
        self._socket: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._closed = False

    def _connect(self) -> zmq.Socket:
        if self._socket is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RECONNECT_IVL, 20)  # ms: a refused reconnect (peer gone) shows up quickly
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
            # connection events tell at once that a peer went away (ZeroMQ itself would only reconnect silently)
            self._monitor = sock.get_monitor_socket(_LOST_EVENTS)
            sock.connect(self.endpoint)
            self._socket = sock
        return self._socket

    def _reset(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._socket.disable_monitor()
            self._socket.close(linger=0)
            self._socket = None
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None

    def _lost(self) -> str | None:
        """Drain connection events; a description of the loss if the peer closed or refused the connection."""
        lost = None
        while self._monitor is not None:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            if event["event"] == zmq.EVENT_DISCONNECTED:
                lost = "closed the connection"
            elif event["event"] == zmq.EVENT_CONNECT_RETRIED:
                lost = "refused the connection"
        return lost

    def call(self, msg_type: str, fields: dict[str, Any] | None = None, tensors: Sequence[torch.Tensor] = (),
             timeout: float | None = None) -> Message:
        """Send one request and wait for its reply; raises a typed SwarmError on error replies and timeouts."""
        timeout = self.config.timeout if timeout is None else timeout
        request_id = next(self._ids)
        frames = encode(msg_type, request_id, fields, tensors)
        with self._lock:
            if self._closed:
                raise PeerUnreachable(f"connection to {self.endpoint} is closed")
            sock = self._connect()
            self._lost()  # events from before this request do not concern it
            simulated = self.config.link_delay > 0 or self.config.link_bandwidth is not None
            if simulated:
                time.sleep(self.config.link_time(frames))
            sock.send_multipart(frames, copy=False)
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            if self._monitor is not None:
                poller.register(self._monitor, zmq.POLLIN)
            end = time.monotonic() + timeout
            while True:
                left = int((end - time.monotonic()) * 1000)
                events = dict(poller.poll(left)) if left > 0 else {}
                if not events:
                    self._reset()
                    raise PeerTimeout(f"{self.endpoint} did not answer {msg_type!r} within {timeout:g} s")
                if sock not in events:
                    lost = self._lost()
                    if lost is not None:
                        self._reset()
                        raise PeerUnreachable(f"{self.endpoint} {lost} before answering {msg_type!r}")
                    continue
                reply = sock.recv_multipart(copy=False)
                try:
                    message = decode(reply)
                except ProtocolError as e:
                    self._reset()
                    raise ProtocolError(f"{self.endpoint} sent a malformed reply: {e}") from None
                if message.id == request_id:
                    if simulated:
                        time.sleep(self.config.link_time(reply))
                    break
                log.debug("dropping a stale reply %d from %s", message.id, self.endpoint)
        if message.type == ERROR:
            raise error_for_code(str(message.get("code", "internal")), str(message.get("message", "")),
                                 peer=self.endpoint)
        return message

    def send_raw(self, frames: list[Any]) -> None:
        """Send frames as they are (tests use this to send malformed messages)."""
        with self._lock:
            self._connect().send_multipart(frames)

    def recv_raw(self, timeout: float) -> list[bytes] | None:
        with self._lock:
            sock = self._connect()
            if not sock.poll(int(timeout * 1000)):
                return None
            return sock.recv_multipart()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._reset()

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
