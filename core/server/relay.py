"""Server-to-server relay: a step's output goes straight to the next server of the session's chain.

For a relayed step the client sends a request to every server of its chain at once. The first gets the hidden
states as usual; each later one gets a `ticket` instead and waits (bounded) for its input. A request may carry
`push` (the next server's address, session and ticket): after computing, the server sends its output there as a
`push` message and answers its own client with the same output, so the client keeps every hop's input for recovery
while the data crosses each link once, and the last server answers the client directly: a step costs one trip per
hop plus one back instead of a round trip per hop.

`Mailbox` matches the two halves of a relayed step (the client's waiting request and the pushed input), whichever
comes first, and forgets halves that wait too long. Pushing runs on its own threads, so the compute worker never
waits on another server. A server only pushes to servers of its model that its discovery knows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ...transport.errors import SwarmError
from ...transport.rpc import Request, RpcClient, RpcClientConfig, normalize_endpoint

log = logging.getLogger(__name__)

MAX_WAITING = 1024  # halves of relayed steps held at once on one server (both kinds together)
MAX_WAIT = 600.0  # seconds a request may wait for its pushed input
PUSH_TTL = 60.0  # seconds a pushed input waits for the client's request before it is dropped


@dataclass(frozen=True)
class PushTarget:
    peer: str
    session: str
    ticket: str


def parse_ticket(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        raise _bad("field 'ticket' must be a string of 1 to 64 characters")
    return value


def parse_push(value: Any, allowed: Callable[[str], bool]) -> PushTarget:
    """A validated push target; raises SwarmError (bad_request) on anything malformed or unknown."""
    if not isinstance(value, dict) or not isinstance(value.get("peer"), str) \
            or not isinstance(value.get("session"), str) or not 0 < len(value["session"]) <= 64:
        raise _bad("relay push must be {peer: tcp://HOST:PORT, session: id, ticket: id}")
    try:
        peer = normalize_endpoint(value["peer"])
    except SwarmError:
        raise _bad(f"bad relay address {value['peer']!r}") from None
    if not allowed(peer):
        raise _error("relay_refused", f"will not relay to {peer}: it is not a server of this swarm known here")
    return PushTarget(peer, value["session"], parse_ticket(value.get("ticket")))


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


class Mailbox:
    """Pairs waiting requests with pushed inputs by (session, ticket); thread-safe."""

    def __init__(self) -> None:
        self._waiting: dict[tuple[str, str], _Waiting] = {}
        self._pushed: dict[tuple[str, str], tuple[torch.Tensor, float]] = {}
        self._lock = threading.Lock()

    def _room(self) -> None:
        if len(self._waiting) + len(self._pushed) >= MAX_WAITING:
            raise _error("busy", "too many relayed steps waiting on this server")

    def wait(self, session: str, ticket: str, request: Request, start: Callable[[torch.Tensor], None],
             timeout: float) -> None:
        key = (session, ticket)
        with self._lock:
            pushed = self._pushed.pop(key, None)
            if pushed is None:
                if key in self._waiting:
                    raise _bad("a request already waits with this ticket")
                self._room()
                self._waiting[key] = _Waiting(request, start, time.monotonic() + timeout)
                return
        start(pushed[0])

    def push(self, session: str, ticket: str, hidden: torch.Tensor) -> None:
        key = (session, ticket)
        with self._lock:
            waiting = self._waiting.pop(key, None)
            if waiting is None:
                if key in self._pushed:
                    raise _bad("an input was already pushed with this ticket")
                self._room()
                self._pushed[key] = (hidden, time.monotonic() + PUSH_TTL)
                return
        waiting.start(hidden)

    def cancel(self, session: str, ticket: str) -> bool:
        """Drop both halves of a relayed step; the waiting request (if any) is answered `cancelled`."""
        with self._lock:
            self._pushed.pop((session, ticket), None)
            waiting = self._waiting.pop((session, ticket), None)
        if waiting is None:
            return False
        waiting.request.fail("cancelled", "the client cancelled this relayed step")
        return True

    def drop_session(self, session: str) -> None:
        with self._lock:
            dropped = [self._waiting.pop(k) for k in [k for k in self._waiting if k[0] == session]]
            for key in [k for k in self._pushed if k[0] == session]:
                del self._pushed[key]
        for waiting in dropped:
            waiting.request.fail("unknown_session", f"session {session[:8]} was closed")

    def expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [self._waiting.pop(k) for k in [k for k, w in self._waiting.items() if w.deadline < now]]
            for key in [k for k, (_, deadline) in self._pushed.items() if deadline < now]:
                del self._pushed[key]
        for waiting in late:
            waiting.request.fail("relay_timeout", "the input of this relayed step never came from the previous "
                                                  "server")

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiting) + len(self._pushed)


class Relay:
    """Pushes outputs to the next servers of chains, on its own threads."""

    def __init__(self, timeout: float = 60.0, threads: int = 8, link_delay: float = 0.0):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="swarm-relay")
        self._clients: dict[str, RpcClient] = {}
        self._lock = threading.Lock()
        self._config = RpcClientConfig(timeout=timeout, link_delay=link_delay)

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
            self._client(target.peer).call("push", {"session": target.session, "ticket": target.ticket,
                                                    "names": ["hidden"]}, [out])
        except SwarmError as e:  # the client learns it from the next server (gone, or timing out on its input)
            log.info("relay to %s failed: %s", target.peer, e)
        except Exception:
            log.exception("relay to %s failed", target.peer)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for client in self._clients.values():
            client.close()
