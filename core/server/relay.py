"""Server-to-server relay: a step's output goes straight to the next server of the session's chain.

A client that asks for a relayed step sends, with its step, the rest of its chain (`relay`: each next server's
address and session id). After computing its blocks, the server sends its output as a step to the next server (which
relays further), and answers the client with the chain's final output plus every hop's input (`inputs_0`, ...), so
the client keeps each hop's history for recovery. When a later server fails, the answer says which one
(`relay_failed`) and carries the inputs up to it, so the client recovers that hop only. Relaying runs on its own
threads: the compute worker never waits on another server. A server only relays to servers it knows from discovery.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ...transport.errors import SwarmError
from ...transport.rpc import Request, RpcClient, RpcClientConfig, normalize_endpoint

log = logging.getLogger(__name__)

MAX_RELAY_HOPS = 32


@dataclass(frozen=True)
class RelayHop:
    peer: str
    session: str


def parse_relay(value: Any, allowed: Callable[[str], bool]) -> list[RelayHop]:
    """Validated relay hops; raises SwarmError (bad_request) on anything malformed or unknown."""
    if not isinstance(value, list) or not 0 < len(value) <= MAX_RELAY_HOPS:
        raise _bad(f"relay must be a list of 1 to {MAX_RELAY_HOPS} hops")
    hops = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("peer"), str) \
                or not isinstance(item.get("session"), str) or not 0 < len(item["session"]) <= 64:
            raise _bad("each relay hop must be {peer: tcp://HOST:PORT, session: id}")
        try:
            peer = normalize_endpoint(item["peer"])
        except SwarmError:
            raise _bad(f"bad relay address {item['peer']!r}") from None
        if not allowed(peer):
            raise _bad(f"will not relay to {peer}: it is not a server of this swarm known here")
        hops.append(RelayHop(peer, item["session"]))
    return hops


def _bad(message: str) -> SwarmError:
    error = SwarmError(message)
    error.code = "bad_request"
    return error


class Relay:
    def __init__(self, timeout: float = 60.0, threads: int = 8, link_delay: float = 0.0):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="swarm-relay")
        self._clients: dict[str, RpcClient] = {}
        self._config = RpcClientConfig(timeout=timeout, link_delay=link_delay)

    def submit(self, request: Request, out: torch.Tensor, mask: torch.Tensor | None, hops: list[RelayHop],
               fields: dict[str, Any]) -> None:
        """Forward `out` along `hops` in the background, then answer `request`."""
        self._pool.submit(self._forward, request, out, mask, hops, fields)

    def _client(self, peer: str) -> RpcClient:
        client = self._clients.get(peer)
        if client is None:
            client = self._clients[peer] = RpcClient(peer, self._config)
        return client

    def _forward(self, request: Request, out: torch.Tensor, mask: torch.Tensor | None, hops: list[RelayHop],
                 fields: dict[str, Any]) -> None:
        first, rest = hops[0], hops[1:]
        names, tensors = ["hidden"], [out]
        if mask is not None:
            names.append("attention_mask")
            tensors.append(mask.to(torch.int8))
        message: dict[str, Any] = {"session": first.session, "names": names}
        if rest:
            message["relay"] = [{"peer": h.peer, "session": h.session} for h in rest]
        try:
            reply = self._client(first.peer).call("step", message, tensors)
        except SwarmError as e:  # the next server failed: tell the client which, with what it should have got
            request.reply({**fields, "names": ["inputs_0"],
                           "relay_failed": {"index": 0, "peer": first.peer, "code": e.code, "message": str(e)}},
                          [out])
            return
        except Exception as e:  # never leave the client without an answer
            log.exception("relay to %s failed", first.peer)
            request.fail("internal", f"relay to {first.peer} failed: {type(e).__name__}: {e}")
            return
        named = dict(zip(reply.get("names", ["hidden"]), reply.tensors, strict=False))
        downstream = [named[f"inputs_{j}"] for j in range(len(rest)) if f"inputs_{j}" in named]
        answer: dict[str, Any] = {**fields}
        failed = reply.get("relay_failed")
        if isinstance(failed, dict) and isinstance(failed.get("index"), int):
            answer["relay_failed"] = {**failed, "index": failed["index"] + 1}
            names = [f"inputs_{j}" for j in range(len(downstream) + 1)]
            request.reply({**answer, "names": names}, [out, *downstream])
            return
        names = ["hidden", *(f"inputs_{j}" for j in range(len(downstream) + 1))]
        request.reply({**answer, "names": names}, [named["hidden"], out, *downstream])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for client in self._clients.values():
            client.close()
