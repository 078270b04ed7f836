"""Measure the routes a client would use: pings, per-server step latency, end-to-end steps/s and forward tokens/s.

Works from server records alone (random hidden states of the model's hidden size), so `swarm bench` needs no model
files. Routes come from the same pure planners the client uses (`plan_inference`, `plan_forward`); `all_routes`
enumerates the other chains that cover every block.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TypeVar

import torch

from ..quant.codecs import choose
from ..quant.compression import WireCodecs
from ..transport.codec import Message
from ..transport.errors import ProtocolError, SwarmError
from ..transport.keys import SwarmKey
from ..transport.messages import Close, Forward, ForwardReply, Open, OpenReply, Ping, RequestMessage, Step, StepReply
from ..transport.packing import COMPRESS, announced, pack, unpack
from ..transport.records import ServerRecord
from ..transport.rpc import CurveClient, RpcClient, RpcClientConfig
from .client.routing import Hop, SpanInfo, missing_ranges, plan_forward, plan_inference

_Reply = TypeVar("_Reply")


@dataclass
class ServerFigures:
    peer: str
    blocks: str
    ping_ms: float | None
    step_ms: float | None  # median inference step (batch 1, one token) through the server's whole span
    error: str | None = None


@dataclass
class RouteFigures:
    route: list[str]  # "peer[start:end]" per hop
    chosen: bool
    steps_per_s: float | None  # end-to-end inference steps/s at batch 1
    step_ms: float | None
    forward_tokens_per_s: float | None  # forward pass tokens/s at the batch given
    error: str | None = None


def all_chains(spans: Sequence[SpanInfo], start: int, end: int, limit: int = 20) -> list[list[Hop]]:
    """Chains covering [start, end) where each hop runs to the end of its server's span (at most `limit`)."""
    chains: list[list[Hop]] = []

    def extend(position: int, chain: list[Hop]) -> None:
        if len(chains) >= limit:
            return
        if position == end:
            chains.append(chain)
            return
        for s in spans:
            if s.start <= position < s.end:
                stop = min(s.end, end)  # a hop runs to the end of its server's span (or of the range)
                extend(stop, [*chain, Hop(s.peer, position, stop)])

    extend(start, [])
    return chains


class Bench:
    def __init__(self, records: Sequence[ServerRecord], timeout: float = 30.0, swarm_key: SwarmKey | None = None,
                 compression: str = "auto"):
        self.records = list(records)
        self.compression, self.codecs = compression, WireCodecs()  # hidden states on the wire, as a client sends
        self.hidden = self.records[0].hidden_size
        self.num_blocks = self.records[0].num_blocks
        config = RpcClientConfig(timeout=timeout, curve=None if swarm_key is None else CurveClient.of(swarm_key))
        self._clients = {r.addresses[0]: RpcClient(r.addresses[0], config) for r in self.records}
        self.rtt: dict[str, float] = {}

    def close(self) -> None:
        for client in self._clients.values():
            client.close()

    def _send(self, peer: str, request: RequestMessage) -> Message:
        """`request` to `peer`, its hidden states compressed (and its reply's asked so) as a client would."""
        msg_type, fields, tensors = request.to_wire()
        record = next(r for r in self.records if r.addresses[0] == peer)
        codec = choose(self.compression, record.dtype, announced(record.capabilities))
        if codec != "none" and msg_type in ("forward", "backward", "step"):
            fields, tensors = pack({**fields, COMPRESS: codec}, tensors, codec, self.codecs)
        return unpack(self._clients[peer].call(msg_type, fields, tensors), self.codecs)

    def _read(self, parse: Callable[[Message], _Reply], peer: str, request: RequestMessage) -> _Reply:
        """`request`'s reply, read by `parse` (a reply type's from_wire); a malformed one is a SwarmError naming the
        server."""
        try:
            return parse(self._send(peer, request))
        except ProtocolError as e:
            raise SwarmError(f"{peer} answered with a malformed reply: {e}") from None

    def ping(self, peer: str, count: int = 20) -> float:
        times = []
        for _ in range(count):
            started = time.perf_counter()
            self._send(peer, Ping())
            times.append(time.perf_counter() - started)
        self.rtt[peer] = statistics.median(times)
        return self.rtt[peer]

    def servers(self, steps: int) -> list[ServerFigures]:
        out = []
        for r in self.records:
            peer = r.addresses[0]
            try:
                ping = self.ping(peer)
                step = self._route_steps([Hop(peer, r.start, r.end)], steps)
                out.append(ServerFigures(peer, f"{r.start}:{r.end}", ping * 1e3, step * 1e3))
            except SwarmError as e:
                out.append(ServerFigures(peer, f"{r.start}:{r.end}", None, None, str(e)))
        return out

    def spans(self) -> list[SpanInfo]:
        return [SpanInfo(r.addresses[0], r.start, r.end, rtt=self.rtt.get(r.addresses[0]), throughput=r.throughput,
                         cache_free=r.cache_tokens_free) for r in self.records]

    def _route_steps(self, chain: list[Hop], steps: int) -> float:
        """Median seconds of one inference step (batch 1, one token) through `chain`."""
        sessions = []
        try:
            for hop in chain:
                opened = self._read(OpenReply.from_wire, hop.peer, Open(steps + 2, 1, blocks=(hop.start, hop.end)))
                sessions.append(opened.session)
            times = []
            for _ in range(steps + 1):
                hidden = torch.randn(1, 1, self.hidden)
                started = time.perf_counter()
                for hop, session in zip(chain, sessions, strict=True):
                    hidden = self._read(StepReply.from_wire, hop.peer, Step(session, hidden)).hidden
                times.append(time.perf_counter() - started)
            return statistics.median(times[1:])  # the first step warms up
        finally:
            for hop, session in zip(chain, sessions, strict=False):
                try:
                    self._send(hop.peer, Close(session))
                except SwarmError:
                    pass

    def _forward_tokens_per_s(self, chain: list[Hop], batch: int, length: int, repeats: int = 3) -> float:
        hidden0 = torch.randn(batch, length, self.hidden)
        best = float("inf")
        for _ in range(repeats):
            hidden = hidden0
            started = time.perf_counter()
            for hop in chain:
                request = Forward(hidden, blocks=(hop.start, hop.end))
                hidden = self._read(ForwardReply.from_wire, hop.peer, request).hidden
            best = min(best, time.perf_counter() - started)
        return batch * length / best

    def routes(self, steps: int, batch: int, length: int, all_routes: bool) -> list[RouteFigures]:
        spans = self.spans()
        missing = missing_ranges(spans, 0, self.num_blocks)
        if missing:
            raise SwarmError("no server covers blocks " + ", ".join(f"{a}:{b}" for a, b in missing))
        chosen = plan_inference(spans, 0, self.num_blocks, cache_needed=steps + 2)
        chains = [chosen]
        if all_routes:
            chains += [c for c in all_chains(spans, 0, self.num_blocks) if c != chosen]
        out = []
        for chain in chains:
            names = [f"{h.peer}[{h.start}:{h.end}]" for h in chain]
            try:
                step = self._route_steps(chain, steps)
                fwd_chain = chain if chain is not chosen else plan_forward(spans, 0, self.num_blocks)
                tokens = self._forward_tokens_per_s(fwd_chain, batch, length)
                out.append(RouteFigures(names, chain is chosen, 1.0 / step, step * 1e3, tokens))
            except SwarmError as e:
                out.append(RouteFigures(names, chain is chosen, None, None, None, str(e)))
        return out


def as_dicts(items: Sequence[object]) -> list[dict]:
    return [asdict(i) for i in items]  # type: ignore[call-overload]
