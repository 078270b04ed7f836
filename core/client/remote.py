"""The client's view of the servers, and running hidden states through a chain of them.

`RemoteSequential` knows the servers of its model (their records, from discovery), plans chains with
`routing.plan_chain`, and runs the model's blocks remotely: `forward` as a differentiable function (the backward
pass asks each server for the gradient w.r.t. its inputs, in reverse order), and `InferenceSession` for generation
with the attention cache kept on the servers. A session keeps every input it sent to each hop, so a lost server's
cache can be rebuilt by replay.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ...transport.codec import PROTOCOL_VERSION
from ...transport.discovery import Discovery
from ...transport.errors import ConfigError, SwarmError
from ...transport.records import ServerRecord
from ...transport.rpc import RpcClient, RpcClientConfig
from .config import ClientConfig
from .routing import Hop, SpanInfo, missing_ranges, plan_chain

log = logging.getLogger(__name__)


class RemoteSequential(torch.nn.Module):
    """Blocks [0, num_blocks) of a model, run by the servers that `discovery` knows of."""

    def __init__(self, num_blocks: int, hidden_size: int, discovery: Discovery,
                 model_filter: Callable[[ServerRecord], bool] = lambda record: True,
                 config: ClientConfig | None = None, owns_discovery: bool = True):
        super().__init__()
        self.num_blocks, self.hidden_size = num_blocks, hidden_size
        self.config = config or ClientConfig()
        self.discovery, self._model_filter, self._owns_discovery = discovery, model_filter, owns_discovery
        self._rpc = RpcClientConfig(timeout=self.config.request_timeout, connect_timeout=self.config.connect_timeout)
        self._clients: dict[str, RpcClient] = {}
        self._warned: set[str] = set()
        # a model dropped without close() still stops its discovery thread and sockets
        self._finalizer = weakref.finalize(self, _release, self._clients, discovery if owns_discovery else None)

    def servers(self) -> list[ServerRecord]:
        """Serving records of this model that this client can use."""
        usable = []
        for record in self.discovery.records(self._model_filter):
            if record.state not in ("online", "joining"):
                continue
            problem = self._check(record)
            if problem is None:
                usable.append(record)
            elif record.peer_id not in self._warned:
                self._warned.add(record.peer_id)
                log.warning("leaving out server %s: %s", record.addresses[0], problem)
        return usable

    def _check(self, record: ServerRecord) -> str | None:
        if record.protocol != PROTOCOL_VERSION:
            return f"speaks protocol {record.protocol}, this client {PROTOCOL_VERSION}"
        if record.num_blocks != self.num_blocks or record.hidden_size != self.hidden_size:
            return (f"serves a model with {record.num_blocks} blocks of hidden size {record.hidden_size}, this one "
                    f"has {self.num_blocks} blocks of hidden size {self.hidden_size}")
        return None

    def covered(self) -> bool:
        return not missing_ranges([_span(r) for r in self.servers()], 0, self.num_blocks)

    def wait_ready(self, timeout: float) -> bool:
        """Wait (bounded) until the known servers cover every block."""
        return self.discovery.wait(lambda _: self.covered(), timeout)

    def plan(self, start: int = 0, end: int | None = None) -> list[Hop]:
        return plan_chain([_span(r) for r in self.servers()], start, self.num_blocks if end is None else end)

    def call(self, hop: Hop, msg_type: str, fields: dict[str, Any], tensors: list[torch.Tensor],
             timeout: float | None = None) -> Any:
        client = self._clients.get(hop.peer)
        if client is None:
            client = self._clients[hop.peer] = RpcClient(hop.peer, self._rpc)
        return client.call(msg_type, fields, tensors, timeout=timeout)

    def hop_forward(self, hop: Hop, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        names, tensors = _named(hidden=hidden, attention_mask=mask)
        reply = self.call(hop, "forward", {"blocks": [hop.start, hop.end], "names": names}, tensors)
        return _one_tensor(reply, hidden)

    def hop_backward(self, hop: Hop, hidden: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor | None
                     ) -> torch.Tensor:
        names, tensors = _named(hidden=hidden, grad_output=grad, attention_mask=mask)
        reply = self.call(hop, "backward", {"blocks": [hop.start, hop.end], "names": names}, tensors)
        return _one_tensor(reply, hidden)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = None if attention_mask is None else attention_mask.to(torch.int8)
        return _RemoteBlocks.apply(hidden, mask, self)

    def inference_session(self, max_length: int, batch_size: int | None = None) -> InferenceSession:
        return InferenceSession(self, max_length, batch_size)

    def close(self) -> None:
        self._finalizer()


def _release(clients: dict[str, RpcClient], discovery: Discovery | None) -> None:
    for client in clients.values():
        client.close()
    clients.clear()
    if discovery is not None:
        discovery.stop()


def _span(record: ServerRecord) -> SpanInfo:
    return SpanInfo(record.addresses[0], record.start, record.end, -record.throughput)


def _named(**tensors: torch.Tensor | None) -> tuple[list[str], list[torch.Tensor]]:
    present = [(k, v) for k, v in tensors.items() if v is not None]
    return [k for k, _ in present], [v for _, v in present]


def _one_tensor(reply: Any, like: torch.Tensor) -> torch.Tensor:
    if len(reply.tensors) != 1 or reply.tensors[0].shape != like.shape:
        raise SwarmError(f"a server answered with tensors {[list(t.shape) for t in reply.tensors]}, "
                         f"expected one of shape {list(like.shape)}")
    return reply.tensors[0].to(like.dtype)


class _RemoteBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, mask: torch.Tensor | None, seq: RemoteSequential) -> torch.Tensor:
        chain = seq.plan()
        inputs = []
        out = hidden.detach()
        for hop in chain:
            inputs.append(out)
            out = seq.hop_forward(hop, out, mask)
        ctx.seq, ctx.chain, ctx.inputs, ctx.mask = seq, chain, inputs, mask
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.contiguous()
        for hop, hidden in zip(reversed(ctx.chain), reversed(ctx.inputs), strict=True):
            grad = ctx.seq.hop_backward(hop, hidden, grad, ctx.mask)
        return grad, None, None


@dataclass
class _HopSession:
    hop: Hop
    session_id: str | None = None
    history: list[tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=list)  # inputs sent, in order


class InferenceSession:
    """Generation state on the servers: each step sends only the new tokens' hidden states through the chain."""

    def __init__(self, seq: RemoteSequential, max_length: int, batch_size: int | None = None):
        if not isinstance(max_length, int) or max_length < 1:
            raise ConfigError(f"max_length must be a positive integer, got {max_length!r}")
        self.seq, self.max_length, self.batch_size = seq, max_length, batch_size
        self.position = 0  # tokens the servers hold
        self.hops: list[_HopSession] = []
        self.closed = False

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self.hops]

    def _open(self, batch: int) -> None:
        self.batch_size = batch
        self.hops = [_HopSession(hop) for hop in self.seq.plan()]
        for hop_session in self.hops:
            hop = hop_session.hop
            reply = self.seq.call(hop, "open", {"batch_size": batch, "max_length": self.max_length,
                                                "blocks": [hop.start, hop.end]}, [],
                                  timeout=self.seq.config.connect_timeout)
            hop_session.session_id = str(reply.get("session"))
        log.info("inference session through %s", " -> ".join(f"{h.peer} [{h.start}:{h.end})" for h in self.route))

    def step(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run new tokens' hidden states [batch, new, hidden] through every hop; returns the last hop's output."""
        if self.closed:
            raise SwarmError("this inference session is closed")
        batch, new, _ = hidden.shape
        if self.batch_size is not None and self.hops and batch != self.batch_size:
            raise ConfigError(f"the session was opened for batch size {self.batch_size}, this step has {batch}")
        if self.position + new > self.max_length:
            raise ConfigError(f"the session holds {self.position} tokens; {new} more would pass its max_length "
                              f"{self.max_length}: open it with a larger max_length")
        if not self.hops:
            self._open(batch)
        mask = None if attention_mask is None else attention_mask.to(torch.int8)
        out = hidden.detach()
        for hop_session in self.hops:
            hop_session.history.append((out, mask))
            names, tensors = _named(hidden=out, attention_mask=mask)
            reply = self.seq.call(hop_session.hop, "step", {"session": hop_session.session_id, "names": names},
                                  tensors)
            out = _one_tensor(reply, out)
        self.position += new
        return out

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for hop_session in self.hops:
            if hop_session.session_id is None:
                continue
            try:
                self.seq.call(hop_session.hop, "close", {"session": hop_session.session_id}, [], timeout=2.0)
            except SwarmError as e:  # the server may be gone; its session expires on its own
                log.debug("closing a session on %s failed: %s", hop_session.hop.peer, e)

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
