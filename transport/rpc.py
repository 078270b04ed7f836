"""ZeroMQ request/reply: a ROUTER server with a non-blocking I/O loop, and a DEALER client with timeouts.

`RpcServer` owns one ROUTER socket in its own I/O thread. Every decoded request goes to a handler callback that must
not block (it answers cheap requests at once and queues compute elsewhere); anyone may answer later from any thread
with `Request.reply` / `Request.fail`. Replies travel to the I/O thread over an inproc socket, so the socket loop
never waits on compute. A malformed message gets an error reply and never stops the loop.

`RpcClient` talks to one peer through a DEALER socket owned by an I/O thread of its own, started at the first call.
Any number of threads may call at once: each hands its encoded request to the I/O thread (a deque and a wake-up byte
on a socket pair, so the caller never touches the socket) and waits, with its own timeout, for the reply that carries
its request id. One thread per client rather than one per ZeroMQ context: nothing global to register or tear down,
closing a client ends only its own thread, and each thread polls three descriptors however many peers the process
talks to; the cost is one mostly sleeping thread per connected peer. Requests, their decoding and the simulated
link delays stay in the callers' threads, so concurrent calls overlap and the I/O thread only moves frames.

Every wait is bounded, and every call ends exactly once: with its reply, a PeerTimeout (its reply, if it comes,
is dropped), PeerUnreachable when the connection monitor reports that the peer closed or refused the connection
(every call in flight fails, and the socket is replaced so nothing queued for the lost connection goes out later)
or when the client is closed, ProtocolError on a malformed reply, or the typed error of an error reply. The socket
queues to live connections only (ZMQ_IMMEDIATE): a request waiting for a connection stays in the I/O thread's
outbox, where it is dropped when its caller times out, so it is never delivered late. A timeout alone in flight
still replaces the socket (a half-open connection gets a fresh start); with other calls in flight it does not
touch them.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from .codec import MAX_HEADER_BYTES, Message, decode, decode_header, encode
from .errors import (
    AccessDenied,
    ConfigError,
    PeerTimeout,
    PeerUnreachable,
    ProtocolError,
    SwarmError,
    error_for_code,
)
from .keys import SwarmKey
from .records import normalize_endpoint  # re-exported: callers import it from here

log = logging.getLogger(__name__)

ERROR = "error"  # message type of an error reply
RESULT = "result"  # message type of a successful reply
_LOST_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
ZAP_DOMAIN = b"swarm"  # the authentication domain of a private swarm's sockets
# why a bind failed, in words a user can act on (ZeroMQ reports a host it cannot parse as "no such device")
_BIND_ERRORS = {errno.EADDRINUSE: "address in use (another process listens on that port)",
                errno.EADDRNOTAVAIL: "not an address of this machine",
                errno.ENODEV: "no such address or interface on this machine",
                errno.EACCES: "permission denied (ports below 1024 need privileges)"}


@dataclass(frozen=True)
class CurveServer:
    """A server of a private swarm: the key pair it presents (z85) and which client keys it admits."""

    public: bytes
    secret: bytes
    admit: Callable[[bytes], bool]  # z85 client key -> admitted (asked at each handshake and each request)


@dataclass(frozen=True)
class CurveClient:
    """A peer of a private swarm: its own key pair and the server key it expects (z85)."""

    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def of(cls, key: SwarmKey) -> CurveClient:
        return cls(key.public, key.secret, key.swarm)


@dataclass(frozen=True)
class RpcServerConfig:
    host: str = "0.0.0.0"  # interface to bind; 0.0.0.0 binds all
    port: int = 0  # 0 picks any free port (see RpcServer.endpoint)
    poll_ms: int = 100  # how often the I/O loop wakes to run its tick callback and check for stop
    # messages queued per connection: past it ZeroMQ stops reading that connection's requests (backpressure) and
    # drops replies to it (a peer that does not read them); replies of 64 KiB and more are bounded in bytes below
    high_water_mark: int = 256
    max_unread_bytes: int = 64 << 20  # reply bytes one peer may leave unread before its further replies are dropped
    max_unread_total: int = 512 << 20  # the same for all peers together (a peer with none unread is still answered)
    max_frame_bytes: int = (1 << 31) + (1 << 20)  # a larger frame closes its connection before ZeroMQ buffers it
    #                                               (the codec refuses tensors over 2 GiB and headers over 1 MiB)
    curve: CurveServer | None = None  # a private swarm: CurveZMQ on every connection, only admitted keys served


class Request:
    """One request received by the server; answer it exactly once with `reply` or `fail` (from any thread)."""

    __slots__ = ("_server", "_identity", "message", "_answered", "_lock", "_frame", "_peer", "encode_reply",
                 "received")

    def __init__(self, server: RpcServer, identity: bytes, message: Message, frame: Any = None):
        self._server = server
        self.received = time.monotonic()  # when it arrived (the server's `on_answer` gets the time to its answer)
        self._identity = identity
        self.message = message
        self._answered = False
        self._lock = threading.Lock()
        self._frame = frame  # a received frame, for the connection's properties (see `peer`)
        self._peer: str | None = None
        # what the receiver may set to turn a reply's fields and tensors into what goes on the wire (the server
        # compresses the reply's tensors with it when the request asked: packing.py)
        self.encode_reply: Callable[[dict[str, Any], list[torch.Tensor]],
                                    tuple[dict[str, Any], list[torch.Tensor]]] | None = None

    @property
    def client(self) -> bytes:
        """The ZeroMQ identity of the requesting connection."""
        return self._identity

    @property
    def peer(self) -> str:
        """Who sent the request, for limits per peer: `key:<z85>` for a peer authenticated by a member key of its
        own (a private swarm; the swarm key itself, which every member may hold, names no one), else `ip:<address>`
        of a remote connection, else `conn:<hex>`: the connection itself (loopback, where every local client shares
        one address, and anything ZeroMQ cannot name)."""
        if self._peer is None:
            curve = self._server.config.curve
            self._peer = _peer_of(self._frame, self._identity, None if curve is None else curve.public.decode())
        return self._peer

    @property
    def key(self) -> str | None:
        """The CURVE key (z85) the request came with (a private swarm), else None. Unlike `peer`, also the swarm key
        itself, which many members may share."""
        key = _frame_property(self._frame, "User-Id")
        return key if key and key != "anonymous" else None

    def _claim(self) -> bool:
        with self._lock:
            if self._answered:
                return False
            self._answered = True
            return True

    def reply(self, fields: dict[str, Any] | None = None, tensors: Sequence[torch.Tensor] = ()) -> None:
        if self._claim():
            if self.encode_reply is not None:
                fields, tensors = self.encode_reply(dict(fields or {}), list(tensors))
            frames = encode(RESULT, self.message.id, fields, tensors)
            self._server.answered(self.message.type, None, self.received)  # before: the peer may ask for figures
            self._server.send(self._identity, frames, self.peer)

    def fail(self, code: str, message: str) -> None:
        if self._claim():
            self._server.answered(self.message.type, code, self.received)
            self._server.send(self._identity, encode(ERROR, self.message.id, {"code": code, "message": message}),
                              self.peer)


class RpcServer:
    """A ROUTER socket served by one I/O thread; `handler(request)` is called there for each decoded request."""

    def __init__(self, handler: Callable[[Request], None], config: RpcServerConfig | None = None,
                 tick: Callable[[], None] | None = None, context: zmq.Context | None = None,
                 on_answer: Callable[[str, str | None, float], None] | None = None):
        self.config = config or RpcServerConfig()
        self._handler = handler
        self._tick = tick
        # called once per answered request, from the thread that answers, just before the answer is sent: (type,
        # error code or None, seconds since it arrived); a malformed message with no readable type has type ""
        self._on_answer = on_answer
        self.bytes_in = 0  # bytes of the messages received (the I/O thread counts them; read them from anywhere)
        self.bytes_out = 0  # bytes of the replies written to the socket (replies dropped unsent are not counted)
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.SNDHWM, self.config.high_water_mark)
        self._router.setsockopt(zmq.RCVHWM, self.config.high_water_mark)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self._router.setsockopt(zmq.MAXMSGSIZE, self.config.max_frame_bytes)
        # replies handed to ZeroMQ and not yet written out, per peer: (tracker, bytes), oldest first (see `send`)
        self._unread: dict[str | bytes, deque[tuple[zmq.MessageTracker, int]]] = {}
        self._unread_total = 0
        self.dropped_replies = 0  # replies not sent because their peer left too many unread
        self._auth = None
        if self.config.curve is not None:
            self._auth = _start_authenticator(self._ctx, self.config.curve.admit)
            self._router.setsockopt(zmq.CURVE_SERVER, 1)
            self._router.setsockopt(zmq.CURVE_PUBLICKEY, self.config.curve.public)
            self._router.setsockopt(zmq.CURVE_SECRETKEY, self.config.curve.secret)
            self._router.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        try:
            if self.config.port:
                self._router.bind(f"tcp://{self.config.host}:{self.config.port}")
                self.port = self.config.port
            else:
                self.port = self._router.bind_to_random_port(f"tcp://{self.config.host}")
        except zmq.ZMQError as e:
            self._router.close(linger=0)
            if self._auth is not None:
                self._auth.stop()
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

    @property
    def unread_bytes(self) -> int:
        """Bytes of replies of 64 KiB or more that ZeroMQ holds because their peers have not read them yet."""
        with self._push_lock:
            self._sweep()
            return self._unread_total

    def send(self, identity: bytes, frames: list[Any], peer: str | None = None) -> None:
        """Queue a reply for the I/O thread (thread-safe).

        A reply of 64 KiB or more is tracked until ZeroMQ has written it out (to the kernel, or dropped it with its
        connection); a peer whose unread replies pass `max_unread_bytes` (or all peers' `max_unread_total`) gets no
        more until it reads: its replies are dropped, as ZeroMQ drops them past the high-water mark, and it times
        out. A peer with none unread always gets its reply, so a reader that keeps up is never refused."""
        if self._stop.is_set():
            return
        key = identity if peer is None else peer
        size = sum(len(f.buffer) if hasattr(f, "buffer") else len(f) for f in frames)
        config = self.config
        with self._push_lock:
            if size < 1 << 16:  # small: bounded by the high-water mark
                self._push.send_multipart([identity, *frames], copy=False)
                return
            self._sweep(key)
            mine = sum(n for _, n in self._unread.get(key, ()))
            if mine and (mine + size > config.max_unread_bytes or self._unread_total + size > config.max_unread_total):
                self.dropped_replies += 1
                log.log(logging.WARNING if self.dropped_replies == 1 else logging.DEBUG,
                        "a peer leaves %d MiB of replies unread: dropping its replies until it reads", mine >> 20)
                return
            tracked = [zmq.Frame(f, track=True, copy=False) for f in frames]
            self._push.send_multipart([identity, *tracked], copy=False)
            self._unread.setdefault(key, deque()).append((zmq.MessageTracker(*tracked), size))
            self._unread_total += size

    def answered(self, msg_type: str, code: str | None, received: float) -> None:
        """A request was answered (with error `code`, or None for a result): tell `on_answer`, when there is one."""
        if self._on_answer is None:
            return
        try:
            self._on_answer(msg_type, code, time.monotonic() - received)
        except Exception:  # counting must never stop an answer
            log.exception("on_answer failed")

    def _sweep(self, key: str | bytes | None = None) -> None:
        """Forget the replies ZeroMQ is done with: of `key`, or of every peer (call with `_push_lock` held)."""
        for k in [key] if key is not None else list(self._unread):
            queue = self._unread.get(k)
            while queue and queue[0][0].done:
                self._unread_total -= queue.popleft()[1]
            if queue is not None and not queue:
                del self._unread[k]

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._push_lock:
            for sock in (self._router, self._pull, self._push):
                sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
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
                if self._unread:
                    with self._push_lock:
                        self._sweep()
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
            self.bytes_out += _size(frames[1:])
            self._router.send_multipart(frames, copy=False)

    def _receive(self) -> None:
        for _ in range(1000):
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity, body = frames[0].bytes, frames[1:]
            self.bytes_in += _size(body)
            try:
                message = decode(body)
            except ProtocolError as e:
                self._reject(identity, body, e)
                continue
            request = Request(self, identity, message, body[0])
            if self.config.curve is not None and not self._admitted(request):
                request.fail("access_denied", "this server does not admit your key any more (it was taken out of "
                                              "its --allowed-keys)")
                continue
            try:
                self._handler(request)
            except SwarmError as e:
                self._send_error(identity, message.id, e.code, str(e), message.type, request.received)
            except Exception as e:
                log.exception("handler failed on %s", message.type)
                self._send_error(identity, message.id, "internal", repr(e), message.type, request.received)

    def _send_error(self, identity: bytes, request_id: int, code: str, text: str, msg_type: str,
                    received: float) -> None:
        """An error reply sent from the I/O thread itself (the request never reached anyone who could answer)."""
        frames = encode(ERROR, request_id, {"code": code, "message": text})
        self.answered(msg_type, code, received)
        self.bytes_out += _size(frames)
        self._router.send_multipart([identity, *frames])

    def _admitted(self, request: Request) -> bool:
        """Whether the key that sent `request` is still admitted (an allow-list may have shrunk since its handshake)."""
        key = request.key
        return key is not None and self.config.curve.admit(key.encode())

    def _reject(self, identity: bytes, body: list[Any], error: ProtocolError) -> None:
        request_id, msg_type, received = 0, "", time.monotonic()
        try:  # answer under the request id when the header at least parses
            header = decode_header(body[0]) if body else {"id": 0}
            request_id, msg_type = header["id"], str(header.get("type", ""))
        except ProtocolError:
            pass
        if error.code not in self._warned:
            self._warned.add(error.code)
            log.warning("malformed message from a peer: %s", error)
        else:
            log.debug("malformed message from a peer: %s", error)
        self._send_error(identity, request_id, error.code, str(error), msg_type, received)


@dataclass(frozen=True)
class RpcClientConfig:
    timeout: float = 30.0  # seconds to wait for a reply unless a call says otherwise
    connect_timeout: float = 5.0  # seconds for the first reply from a peer (used by callers that probe peers)
    link_delay: float = 0.0  # simulated one-way latency added to each request and each reply (benchmarks)
    link_bandwidth: float | None = None  # simulated link speed in bytes/s (None: as fast as loopback)
    curve: CurveClient | None = None  # a private swarm: our key pair and the swarm's server key

    def link_time(self, frames: Sequence[Any]) -> float:
        """Seconds a message of `frames` spends on the simulated link."""
        if self.link_bandwidth is None:
            return self.link_delay
        size = sum(len(f.buffer) if hasattr(f, "buffer") else len(f) for f in frames)
        return self.link_delay + size / self.link_bandwidth


class _Call:
    """One request of a caller: its frames until they are sent, then the reply or the error that ends it.

    `done` is held from the start and released once, by whoever ends the call (a reply, a loss, close); the caller
    waits on it with its own timeout. `over` is set, under the link's lock, by whoever takes the call out of the
    pending table; the I/O thread does not send a call that is over.
    """

    __slots__ = ("id", "type", "frames", "done", "reply", "error", "taken", "over")

    def __init__(self, request_id: int, msg_type: str, frames: list[Any]):
        self.id = request_id
        self.type = msg_type
        self.frames = frames
        self.done = threading.Lock()
        self.done.acquire()
        self.reply: tuple[dict[str, Any], list[Any]] | None = None  # checked header and frames
        self.error: SwarmError | None = None
        self.taken = False  # the I/O thread has it (in its outbox, or sent)
        self.over = False

    def finish(self, reply: tuple[dict[str, Any], list[Any]] | None = None, error: SwarmError | None = None) -> None:
        self.reply, self.error, self.frames = reply, error, []
        self.done.release()


class _Link:
    """The connection of one RpcClient to its peer: a DEALER socket owned by one I/O thread.

    Callers `submit` calls (thread-safe: a deque plus a wake-up byte on a socket pair that the I/O thread polls with
    its ZeroMQ sockets). The I/O thread sends them in order, matches each reply to its call by request id, drops late
    replies, and fails every call it holds when the monitor reports that the peer closed or refused the connection
    (the socket is then replaced, so nothing queued for the lost connection goes out later). It holds no reference to
    the RpcClient, so a client dropped without `close` is finalized, which closes the link and ends the thread.
    """

    def __init__(self, endpoint: str, context: zmq.Context, curve: CurveClient | None = None):
        self.endpoint = endpoint
        self._ctx = context
        self._curve = curve
        self._lock = threading.Lock()  # pending, queue, closed, reset_wanted, thread
        self._pending: dict[int, _Call] = {}  # request id -> call whose caller still waits
        self._queue: deque[_Call] = deque()  # submitted, not yet taken by the I/O thread
        self._ipv6 = endpoint.startswith("tcp://[")  # an IPv6 literal needs the option; names stay IPv4 (below)
        self._closed = False
        self._dropped = False  # the client was finalized on the I/O thread itself: close at the next turn
        self._reset_wanted = False
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # owned by the I/O thread
        self._poller = zmq.Poller()
        self._polling = 0  # the events the socket is registered for
        self._socket: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._outbox: deque[_Call] = deque()  # taken, waiting for the connection (ZMQ_IMMEDIATE) or for room
        # the raw socket of send_raw/recv_raw, used from callers' threads under its own lock
        self.raw_lock = threading.Lock()
        self._raw: zmq.Socket | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    # -- callers' side -------------------------------------------------------------------------------------------

    def submit(self, call: _Call) -> None:
        with self._lock:
            if self._closed:
                raise PeerUnreachable(f"connection to {self.endpoint} is closed")
            if self._thread is None:
                thread = threading.Thread(target=self._run, name=f"swarm-rpc-client {self.endpoint}", daemon=True)
                thread.start()
                self._thread = thread
            self._pending[call.id] = call
            self._queue.append(call)
        self._wake()

    def abandon(self, call: _Call) -> bool:
        """Forget a call whose caller stopped waiting; False when it ended meanwhile (then `done` is released)."""
        with self._lock:
            if self._pending.pop(call.id, None) is None:
                return False
            call.over = True
            # alone in flight: replace the socket, as a timeout always did (a half-open connection gets a fresh
            # start); with other calls in flight the socket stays, their replies are on the way
            self._reset_wanted = not self._pending
        self._wake()
        return True

    def close(self) -> None:
        """Fail the calls in flight at once, then stop the I/O thread (bounded) and close every socket."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            calls = self._take_pending(lambda call: True)
            thread = self._thread
        for call in calls:
            call.finish(error=PeerUnreachable(f"connection to {self.endpoint} closed while waiting for "
                                              f"{call.type!r}"))
        with self.raw_lock:
            if self._raw is not None:
                self._raw.close(linger=0)
                self._raw = None
        if thread is None:
            self._wake_r.close()
        else:
            self._wake()
            if thread is not threading.current_thread():  # a finalizer may run on any thread
                thread.join(2.0)
        self._wake_w.close()  # here only: no wake-up ever goes to a closed (perhaps reused) descriptor

    def release(self) -> None:
        """`close`, for the finalizer of a dropped client. The garbage collector may run it on the I/O thread
        itself, perhaps while that thread holds the lock: there it only marks the link, closed at the next turn."""
        if threading.current_thread() is self._thread:
            self._dropped = True
            self._wake()
        else:
            self.close()

    def raw_socket(self) -> zmq.Socket:
        """The separate socket of send_raw/recv_raw (call with `raw_lock` held)."""
        if self._closed:
            raise PeerUnreachable(f"connection to {self.endpoint} is closed")
        if self._raw is None:
            self._raw, _ = self._open(monitor=False)
        return self._raw

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full: a wake-up is pending anyway; closed: the thread is gone
            self._wake_w.send(b"\0")

    def _take_pending(self, which: Callable[[_Call], bool]) -> list[_Call]:
        """Remove the pending calls `which` selects and mark them over (call with `_lock` held)."""
        calls = [call for call in self._pending.values() if which(call)]
        for call in calls:
            del self._pending[call.id]
            call.over = True
        return calls

    def _fail_taken(self, error: Callable[[_Call], SwarmError]) -> None:
        """Fail every call the I/O thread holds (sent or in the outbox); calls just submitted are not concerned."""
        with self._lock:
            calls = self._take_pending(lambda call: call.taken)
        for call in calls:
            call.finish(error=error(call))

    # -- the I/O thread ------------------------------------------------------------------------------------------

    def _open(self, monitor: bool) -> tuple[zmq.Socket, zmq.Socket | None]:
        """A DEALER connected to the peer, and its monitor; any ZeroMQ refusal becomes PeerUnreachable."""
        sock = events = None
        try:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RECONNECT_IVL, 20)  # ms: a refused reconnect (peer gone) shows up quickly
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
            if self._curve is not None:
                sock.setsockopt(zmq.CURVE_SERVERKEY, self._curve.server)
                sock.setsockopt(zmq.CURVE_PUBLICKEY, self._curve.public)
                sock.setsockopt(zmq.CURVE_SECRETKEY, self._curve.secret)
            if self._ipv6:
                # only for literals: with it a name may resolve to IPv6 first (localhost to ::1), where a server
                # bound to 0.0.0.0 does not listen
                sock.setsockopt(zmq.IPV6, 1)
            if monitor:
                # queue to a live connection only: what waits for one stays in our outbox, where a call that
                # timed out is dropped instead of being delivered late
                sock.setsockopt(zmq.IMMEDIATE, 1)
                # connection events tell at once that a peer went away (ZeroMQ itself would only reconnect silently)
                events = sock.get_monitor_socket(_LOST_EVENTS | _HANDSHAKE_FAILED)
            sock.connect(self.endpoint)
        except zmq.ZMQError as e:
            if sock is not None:
                _close(sock, events)
            raise PeerUnreachable(f"cannot connect to {self.endpoint}: {e.strerror}") from None
        return sock, events

    def _connect(self) -> zmq.Socket:
        if self._socket is None:
            self._socket, self._monitor = self._open(monitor=True)
            self._poller.register(self._monitor, zmq.POLLIN)
            self._poller.register(self._socket, zmq.POLLIN)
            self._polling = zmq.POLLIN
        return self._socket

    def _reset(self) -> None:
        if self._socket is None:
            return
        self._poller.unregister(self._socket)
        self._poller.unregister(self._monitor)
        _close(self._socket, self._monitor)
        self._socket = self._monitor = None
        self._polling = 0

    def _run(self) -> None:
        wake = self._wake_r.fileno()
        self._poller.register(wake, zmq.POLLIN)
        try:
            while True:
                try:
                    if not self._turn(wake):
                        return
                except zmq.ContextTerminated:
                    return
                except Exception:  # the thread must outlive any single failure; the calls it held end here
                    log.exception("unexpected error in the client I/O loop of %s", self.endpoint)
                    self._fail_taken(lambda call: PeerUnreachable(f"{self.endpoint}: connection failed"))
                    self._outbox.clear()
                    self._reset()
        finally:
            with self._lock:
                self._closed = True
                calls = self._take_pending(lambda call: True)
            for call in calls:
                call.finish(error=PeerUnreachable(f"connection to {self.endpoint} is closed"))
            self._reset()
            self._wake_r.close()

    def _turn(self, wake: int) -> bool:
        """One turn of the I/O loop; False when the link is closed."""
        if self._dropped:
            self.close()
            return False
        sock = self._socket
        if sock is not None:
            wanted = zmq.POLLIN | (zmq.POLLOUT if self._outbox else 0)
            if wanted != self._polling:
                self._poller.modify(sock, wanted)
                self._polling = wanted
        events = dict(self._poller.poll(1000))  # bounded only as a safety net: submit and close wake the thread
        if wake in events:
            with contextlib.suppress(OSError):  # more than 4096 wake-ups: the next poll returns at once
                self._wake_r.recv(4096)
        with self._lock:
            if self._closed:
                return False
            fresh = list(self._queue)
            self._queue.clear()
            reset, self._reset_wanted = self._reset_wanted and not self._pending, False
        if reset:
            self._reset()
        replies = []
        if sock is not None and sock is self._socket and events.get(sock, 0) & zmq.POLLIN:
            replies = self._receive(sock)  # replies first: what came before a loss still counts
        if self._monitor is not None and self._monitor in events:
            self._check_connection()
        for call in fresh:
            call.taken = True
            if not call.over:
                self._outbox.append(call)
        if self._outbox:
            self._flush()
        for call, reply in replies:  # last: a woken caller then finds the thread back in poll, not holding the GIL
            call.finish(reply=reply)
        return True

    def _check_connection(self) -> None:
        """Drain connection events; when the peer closed or refused the connection, fail what is in flight."""
        lost = denied = None
        while self._monitor is not None:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            if denied is None and event["event"] & _HANDSHAKE_FAILED:
                denied = self._denied(event["event"])
            if lost is not None:  # the first event tells what happened (a close is followed by refused retries)
                continue
            if event["event"] == zmq.EVENT_DISCONNECTED:
                lost = "closed the connection"
            elif event["event"] == zmq.EVENT_CONNECT_RETRIED:
                lost = "refused the connection"
        if denied is not None:
            self._fail_taken(lambda call: AccessDenied(denied, code="access_denied",
                                                       peer=self.endpoint))
            self._outbox.clear()
            self._reset()
        elif lost is not None:
            self._fail_taken(lambda call: PeerUnreachable(f"{self.endpoint} {lost} before answering {call.type!r}"))
            self._outbox.clear()
            self._reset()  # a fresh socket: nothing queued for the lost connection goes out later

    def _denied(self, event: int) -> str:
        """Why the security handshake failed, in words a user can act on."""
        if self._curve is None:
            return "the server belongs to a private swarm: pass the swarm's key (--swarm-key) to connect"
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return "the server does not admit our key: it is neither the swarm key nor in the server's --allowed-keys"
        return ("the server did not complete the private swarm's handshake: it belongs to an open swarm, or to "
                "another private swarm (another --swarm-key)")

    def _receive(self, sock: zmq.Socket) -> list[tuple[_Call, tuple[dict[str, Any], list[Any]]]]:
        """Take the replies that came (at most 1000 a turn) and match them to their calls."""
        replies = []
        for _ in range(1000):
            if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                break
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            try:
                header = decode_header(frames[0])
            except ProtocolError as e:
                self._misrouted(frames, e)
                continue
            with self._lock:
                call = self._pending.pop(header["id"], None)
                if call is not None:
                    call.over = True
            if call is None:
                log.debug("dropping a late reply %d from %s", header["id"], self.endpoint)
            else:
                replies.append((call, (header, frames)))
        return replies

    def _misrouted(self, frames: list[Any], error: ProtocolError) -> None:
        """A reply whose header does not check: it fails its call when its id can be read, else every call sent."""
        request_id = _peek_id(frames[0])
        with self._lock:
            calls = self._take_pending(lambda call: call.taken and request_id in (None, call.id))
        for call in calls:
            call.finish(error=ProtocolError(f"{self.endpoint} sent a malformed reply: {error}"))

    def _flush(self) -> None:
        while self._outbox:
            call = self._outbox[0]
            frames = call.frames
            if call.over or not frames:  # its caller gave up, or close ended it meanwhile
                self._outbox.popleft()
                continue
            try:
                sock = self._connect()
            except PeerUnreachable as e:
                self._fail_taken(lambda call, e=e: PeerUnreachable(str(e)))
                self._outbox.clear()
                return
            try:
                sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.Again:  # no live connection yet, or no room: POLLOUT says when
                return
            except zmq.ZMQError as e:
                self._outbox.popleft()
                with self._lock:
                    ended = self._pending.pop(call.id, None) is not None
                    call.over = True
                if ended:
                    call.finish(error=PeerUnreachable(f"cannot send {call.type!r} to {self.endpoint}: {e.strerror}"))
                continue
            self._outbox.popleft()
            call.frames = []


class _Admission:
    """The credentials provider of pyzmq's authenticator: asks `admit` about each client key at its handshake."""

    def __init__(self, admit: Callable[[bytes], bool]):
        self._admit = admit

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            return bool(self._admit(key))
        except Exception:  # a broken allow-list admits no one, and the server goes on
            log.exception("checking a client key failed")
            return False


def _start_authenticator(context: zmq.Context, admit: Callable[[bytes], bool]) -> Any:
    """A ZAP handler (pyzmq's authenticator thread) for the sockets of `context`: CURVE keys that `admit` accepts."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(context, log=logging.getLogger(__name__ + ".auth"))
    auth.start()
    auth.configure_curve_callback(ZAP_DOMAIN.decode(), credentials_provider=_Admission(admit))
    return auth


def _peer_of(frame: Any, identity: bytes, shared: str | None = None) -> str:
    """See `Request.peer`: the properties ZeroMQ keeps on a received frame of the connection. The `shared` key (the
    swarm key itself, which every member that holds it presents) names no one: the address does."""
    for prop, prefix in (("User-Id", "key:"), ("Peer-Address", "ip:")):
        value = _frame_property(frame, prop)
        if value and value not in ("anonymous", shared) and not (prefix == "ip:" and _loopback(value)):
            return prefix + value
    return "conn:" + identity.hex()


def _size(frames: Sequence[Any]) -> int:
    """Bytes of a message's frames (ZeroMQ frames or bytes)."""
    return sum(f.nbytes if isinstance(f, memoryview) else len(f) for f in frames)


def _frame_property(frame: Any, name: str) -> str | None:
    """A property ZeroMQ keeps on a received frame of the connection (None when it has none)."""
    try:
        return frame.get(name) if frame is not None else None
    except (zmq.ZMQError, AttributeError, UnicodeDecodeError):
        return None


def _loopback(address: str) -> bool:
    return address.startswith("127.") or address in ("::1", "::ffff:127.0.0.1")


def _close(sock: zmq.Socket, monitor: zmq.Socket | None) -> None:
    if monitor is not None:
        with contextlib.suppress(zmq.ZMQError):
            sock.disable_monitor()
        monitor.close(linger=0)
    sock.close(linger=0)


def _peek_id(frame: Any) -> int | None:
    """The request id of a header that does not check (wrong version, bad fields), when it has one."""
    raw = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
    if len(raw) > MAX_HEADER_BYTES:
        return None
    try:
        header = msgpack.unpackb(raw, raw=False)
    except Exception:  # garbage of any kind
        return None
    request_id = header.get("id") if isinstance(header, dict) else None
    return request_id if isinstance(request_id, int) and not isinstance(request_id, bool) else None


class RpcClient:
    """A connection to one peer. `call` is thread-safe, and calls from several threads are in flight together."""

    _ids = itertools.count(1)

    def __init__(self, endpoint: str, config: RpcClientConfig | None = None, context: zmq.Context | None = None):
        self.endpoint = normalize_endpoint(endpoint)
        self.config = config or RpcClientConfig()
        self._link = _Link(self.endpoint, context or zmq.Context.instance(), self.config.curve)
        # a client dropped without close() still ends its thread and closes its sockets
        self._finalizer = weakref.finalize(self, self._link.release)

    def call(self, msg_type: str, fields: dict[str, Any] | None = None, tensors: Sequence[torch.Tensor] = (),
             timeout: float | None = None) -> Message:
        """Send one request and wait for its reply; raises a typed SwarmError on error replies and timeouts."""
        timeout = self.config.timeout if timeout is None else timeout
        request_id = next(self._ids)
        frames = encode(msg_type, request_id, fields, tensors)
        if self._link.closed:
            raise PeerUnreachable(f"connection to {self.endpoint} is closed")
        simulated = self.config.link_delay > 0 or self.config.link_bandwidth is not None
        if simulated:
            time.sleep(self.config.link_time(frames))
        call = _Call(request_id, msg_type, frames)
        self._link.submit(call)
        if not call.done.acquire(timeout=min(max(timeout, 0.0), threading.TIMEOUT_MAX)):
            if self._link.abandon(call):
                raise PeerTimeout(f"{self.endpoint} did not answer {msg_type!r} within {timeout:g} s")
            call.done.acquire()  # it ended as we gave up: take what came
        if call.reply is None:
            raise call.error or PeerUnreachable(f"connection to {self.endpoint} is closed")
        header, reply = call.reply
        try:
            message = decode(reply, header)
        except ProtocolError as e:
            raise ProtocolError(f"{self.endpoint} sent a malformed reply: {e}") from None
        if simulated:
            time.sleep(self.config.link_time(reply))
        if message.type == ERROR:
            raise error_for_code(str(message.get("code", "internal")), str(message.get("message", "")),
                                 peer=self.endpoint)
        return message

    def send_raw(self, frames: list[Any]) -> None:
        """Send frames as they are, on a socket of their own (tests use this to send malformed messages)."""
        with self._link.raw_lock:
            self._link.raw_socket().send_multipart(frames)

    def recv_raw(self, timeout: float) -> list[bytes] | None:
        """The next message on the socket of `send_raw`, or None after `timeout` seconds."""
        with self._link.raw_lock:
            sock = self._link.raw_socket()
            if not sock.poll(int(timeout * 1000)):
                return None
            return sock.recv_multipart()

    def close(self) -> None:
        """Close the connection; calls still waiting raise PeerUnreachable at once."""
        self._finalizer()

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
