"""Server-to-server relay: a step's output goes straight to the next server of the session's chain.

For a relayed step the client sends a request to every server of its chain at once. The first gets the hidden
states as usual; each later one gets a `ticket` instead and waits (bounded) for its input. A request may carry
`push` (the next server's address, session and ticket): after computing, the server sends its output there as a
`push` message and answers its own client with the same output, so the client keeps every hop's input for recovery
while the data crosses each link once, and the last server answers the client directly: a step costs one trip per
hop plus one back instead of a round trip per hop.

`Mailbox` matches the two halves of a relayed step (the client's waiting request and the pushed input), whichever
comes first, and forgets halves that wait too long. What it holds is bounded for the server and, at a quarter of
that, for each peer that sent the halves (`Request.peer`), so one peer that parks steps whose input never comes
cannot make everyone else's relayed steps busy. Pushing runs on its own threads, so the compute worker never
waits on another server. A server only pushes to servers of its model that its discovery knows, with the
compression the step's `push` names (transport/packing.py; the client chose one both servers announced).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ...quant.compression import WireCodecs
from ...transport.errors import SwarmError
from ...transport.messages import Push, PushTarget
from ...transport.packing import pack
from ...transport.rpc import CurveClient, Request, RpcClient, RpcClientConfig

log = logging.getLogger(__name__)

MAX_WAITING = 1024  # halves of relayed steps held at once on one server (both kinds together)
MAX_PUSHED_BYTES = 256 << 20  # bytes of pushed inputs held at once on one server
PEER_SHARE = 0.25  # what one peer may hold of either bound
PUSH_TTL = 60.0  # seconds a pushed input waits for the client's request before it is dropped


def _error(code: str, message: str) -> SwarmError:
    error = SwarmError(message)
    error.code = code
    return error


def _bad(message: str) -> SwarmError:
    return _error("bad_request", message)


@dataclass
class _Waiting:
    request: Request
    start: Callable[[torch.Tensor], None]  # runs the step once its input is here
    deadline: float
    peer: str = ""  # who sent it


@dataclass
class _Pushed:
    hidden: torch.Tensor
    deadline: float
    peer: str = ""


class Mailbox:
    """Pairs waiting requests with pushed inputs by (session, ticket); thread-safe."""

    def __init__(self) -> None:
        self._waiting: dict[tuple[str, str], _Waiting] = {}
        self._pushed: dict[tuple[str, str], _Pushed] = {}
        self._bytes = 0  # of the pushed inputs held
        self._held: dict[str, list[int]] = {}  # peer -> [halves, pushed bytes] it holds
        self._lock = threading.Lock()

    def _room(self, peer: str, nbytes: int = 0) -> None:
        if len(self._waiting) + len(self._pushed) >= MAX_WAITING or self._bytes + nbytes > MAX_PUSHED_BYTES:
            raise _error("busy", "too many relayed steps waiting on this server")
        count, held = self._held.get(peer, (0, 0))
        if count + 1 > MAX_WAITING * PEER_SHARE or held + nbytes > MAX_PUSHED_BYTES * PEER_SHARE:
            raise _error("busy", f"you have {count} relayed steps waiting on this server already")

    def _hold(self, peer: str, count: int, nbytes: int) -> None:
        held = self._held.setdefault(peer, [0, 0])
        held[0] += count
        held[1] += nbytes
        if held[0] <= 0:
            del self._held[peer]

    def _take(self, key: tuple[str, str]) -> _Pushed | None:
        pushed = self._pushed.pop(key, None)
        if pushed is not None:
            self._bytes -= pushed.hidden.nbytes
            self._hold(pushed.peer, -1, -pushed.hidden.nbytes)
        return pushed

    def _unwait(self, key: tuple[str, str]) -> _Waiting | None:
        waiting = self._waiting.pop(key, None)
        if waiting is not None:
            self._hold(waiting.peer, -1, 0)
        return waiting

    def wait(self, session: str, ticket: str, request: Request, start: Callable[[torch.Tensor], None],
             timeout: float) -> None:
        key = (session, ticket)
        with self._lock:
            pushed = self._take(key)
            if pushed is None:
                if key in self._waiting:
                    raise _bad("a request already waits with this ticket")
                self._room(request.peer)
                self._waiting[key] = _Waiting(request, start, time.monotonic() + timeout, request.peer)
                self._hold(request.peer, 1, 0)
                return
        start(pushed.hidden)

    def push(self, session: str, ticket: str, hidden: torch.Tensor, peer: str = "") -> None:
        key = (session, ticket)
        with self._lock:
            waiting = self._unwait(key)
            if waiting is None:
                if key in self._pushed:
                    raise _bad("an input was already pushed with this ticket")
                self._room(peer, hidden.nbytes)
                self._pushed[key] = _Pushed(hidden, time.monotonic() + PUSH_TTL, peer)
                self._bytes += hidden.nbytes
                self._hold(peer, 1, hidden.nbytes)
                return
        waiting.start(hidden)

    def cancel(self, session: str, ticket: str) -> bool:
        """Drop both halves of a relayed step; the waiting request (if any) is answered `cancelled`."""
        with self._lock:
            self._take((session, ticket))
            waiting = self._unwait((session, ticket))
        if waiting is None:
            return False
        waiting.request.fail("cancelled", "the client cancelled this relayed step")
        return True

    def drop_session(self, session: str) -> None:
        with self._lock:
            dropped = [self._unwait(k) for k in [k for k in self._waiting if k[0] == session]]
            for key in [k for k in self._pushed if k[0] == session]:
                self._take(key)
        for waiting in dropped:
            waiting.request.fail("unknown_session", f"session {session[:8]} was closed")

    def expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [self._unwait(k) for k in [k for k, w in self._waiting.items() if w.deadline < now]]
            for key in [k for k, pushed in self._pushed.items() if pushed.deadline < now]:
                self._take(key)
        for waiting in late:
            waiting.request.fail("relay_timeout", "the input of this relayed step never came from the previous "
                                                  "server")

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiting) + len(self._pushed)


class Relay:
    """Pushes outputs to the next servers of chains, on its own threads."""

    def __init__(self, timeout: float = 60.0, threads: int = 8, link_delay: float = 0.0,
                 curve: CurveClient | None = None):
        self.codecs = WireCodecs()  # what pushes may be compressed with (the step's push says which)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="swarm-relay")
        self._clients: dict[str, RpcClient] = {}
        self._lock = threading.Lock()
        self._config = RpcClientConfig(timeout=timeout, link_delay=link_delay, curve=curve)

    def push(self, target: PushTarget, out: torch.Tensor) -> None:
        self._pool.submit(self._push, target, out)

    def _client(self, peer: str) -> RpcClient:
        with self._lock:
            client = self._clients.get(peer)
            if client is None:
                client = self._clients[peer] = RpcClient(peer, self._config)
            return client

    def _push(self, target: PushTarget, out: torch.Tensor) -> None:
        try:
            msg_type, fields, tensors = Push(target.session, target.ticket, out).to_wire()
            self._client(target.peer).call(msg_type, *pack(fields, tensors, target.compress, self.codecs))
        except SwarmError as e:  # the client learns it from the next server (gone, or timing out on its input)
            log.info("relay to %s failed: %s", target.peer, e)
        except Exception:
            log.exception("relay to %s failed", target.peer)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for client in self._clients.values():
            client.close()
