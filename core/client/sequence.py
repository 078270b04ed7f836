"""The model's blocks as one differentiable torch module, run by the servers.

`RemoteSequential` is the `Peers` of one model (peers.py: connections, bans, routing) seen as a torch module:
`forward` runs hidden states through a chain of servers planned for batch work (split by rows into requests the
servers accept), and its backward asks each server for the gradient w.r.t. its inputs (and w.r.t. the deep prompts
and the client's LoRA of its blocks), in reverse order. A forward may name an `adapter` the servers hold (only servers
that hold it are used) and carry the client's own `lora` (sent to each server for its blocks, never kept).
A forward that autograd will need keeps its graphs on the servers (`keep`), so the backward costs them one pass
instead of two. When a server fails in either direction, it is banned and its blocks are run again on others.
With `ClientConfig.verify`, a random fraction of the forward requests is also sent to a second server of the same
blocks and the outputs compared (verify.py); a server caught answering wrong outputs is banned for long and the forward
runs again on another route.
`inference_session` opens generation with the caches on the servers (session.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ...transport.discovery import Discovery
from ...transport.errors import ConfigError, SwarmError
from ...transport.messages import Backward, BackwardReply, Forward, ForwardReply, LoraWeights
from ...transport.records import ServerRecord
from ..device import CPU, to_device
from .config import ClientConfig
from .peers import RECOVERABLE, HopFailed, Peers, hop_prompts, read_reply, same_shape
from .routing import Hop
from .session import InferenceSession
from .verify import Verifier, VerifyMismatch


class RemoteSequential(Peers, torch.nn.Module):
    """Blocks [0, num_blocks) of a model, run by the servers that `discovery` knows of."""

    def __init__(self, num_blocks: int, hidden_size: int, discovery: Discovery,
                 model_filter: Callable[[ServerRecord], bool] = lambda record: True,
                 config: ClientConfig | None = None, owns_discovery: bool = True):
        torch.nn.Module.__init__(self)
        Peers.__init__(self, num_blocks, hidden_size, discovery, model_filter, config, owns_discovery)
        self.verifier = Verifier(self)  # checks a fraction of the servers' outputs on other servers (verify.py)

    def _rows(self, hidden: torch.Tensor) -> list[slice]:
        """Row ranges of a batch small enough for one request (`ClientConfig.max_request_tokens`)."""
        batch, length = hidden.shape[:2]
        limit = self.config.max_request_tokens
        if length > limit:
            raise ConfigError(f"a sequence of {length} tokens is longer than one request may hold ({limit} tokens, "
                              "ClientConfig.max_request_tokens); use shorter inputs")
        per = max(1, limit // length)
        return [slice(i, min(i + per, batch)) for i in range(0, batch, per)]

    def hop_forward(self, hop: Hop, hidden: torch.Tensor, mask: torch.Tensor | None,
                    prompts: torch.Tensor | None = None, kept: list[str | None] | None = None,
                    adapter: str | None = None, lora: LoraWeights | None = None) -> torch.Tensor:
        """Blocks of `hop` over `hidden` (split by rows into requests the server accepts). With a `kept` list, the
        server keeps each request's graph for the backward and the list gets their ids."""
        outs = []
        hop_lora = None if lora is None else lora.sliced(hop.start, hop.end)
        for rows in self._rows(hidden):
            request = Forward(hidden[rows], _sliced(mask, rows), hop_prompts(prompts, hop, rows),
                              blocks=(hop.start, hop.end), keep=kept is not None, adapter=adapter, lora=hop_lora)
            check = self.verifier.maybe(hop, request, mask=request.attention_mask, adapter=adapter)  # runs alongside
            reply = read_reply(ForwardReply.from_wire, self.send(hop, request), hop)
            out = same_shape(reply.hidden, hidden[rows], hop, "forward output")
            if check is not None and not self.verifier.judge(check, out):
                raise HopFailed(hop, VerifyMismatch("its forward output did not match other servers'"))
            outs.append(out)
            if kept is not None:
                kept.append(reply.kept)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def hop_backward(self, hop: Hop, hidden: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor | None,
                     prompts: torch.Tensor | None = None, kept: list[str | None] | None = None,
                     adapter: str | None = None, lora: LoraWeights | None = None,
                     grad_lora: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients w.r.t. the input of `hop`'s blocks and w.r.t. their prompts (`prompts[hop.start:hop.end]`);
        `kept` are the ids of the forward's kept graphs (the server runs the blocks again without them). The
        gradients of the client's `lora` for these blocks are added into `grad_lora` (name -> [blocks, ...])."""
        grads, grad_prompts = [], []
        hop_lora = None if lora is None else lora.sliced(hop.start, hop.end)
        for n, rows in enumerate(self._rows(hidden)):
            sub_prompts = hop_prompts(prompts, hop, rows)
            request = Backward(hidden[rows], grad[rows], _sliced(mask, rows), sub_prompts, blocks=(hop.start, hop.end),
                               kept=kept[n] if kept is not None and n < len(kept) else None, adapter=adapter,
                               lora=hop_lora)
            reply = read_reply(BackwardReply.from_wire, self.send(hop, request), hop)
            grads.append(same_shape(reply.grad_input, hidden[rows], hop, "input gradient"))
            if hop_lora is not None and grad_lora is not None:
                for name, like in hop_lora.tensors().items():
                    got = reply.grad_lora.get(name)
                    if got is None:
                        raise SwarmError(f"{hop.peer} answered a backward pass with a LoRA without its gradient")
                    grad_lora[name][hop.start:hop.end] += same_shape(got, like, hop, f"{name} gradient")
            if sub_prompts is None:
                continue
            if reply.grad_prompts is None:
                raise SwarmError(f"{hop.peer} answered a backward pass with prompts without their gradient")
            grad_prompts.append(same_shape(reply.grad_prompts, sub_prompts, hop, "prompt gradient"))
        grad_input = grads[0] if len(grads) == 1 else torch.cat(grads)
        if not grad_prompts:
            return grad_input, None
        if prompts.shape[1] == 1:  # one prompt for the whole batch: its gradient sums over the rows
            return grad_input, torch.stack(grad_prompts).sum(0)
        return grad_input, torch.cat(grad_prompts, dim=1)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                prompts: torch.Tensor | None = None, adapter: str | None = None,
                lora: LoraWeights | None = None) -> torch.Tensor:
        """The blocks over `hidden`, differentiable w.r.t. `hidden`, the deep `prompts` [blocks, batch or 1,
        prompt_length, hidden] (one per block, added at the first positions before it) and the client's `lora`
        (stacks over all blocks); through servers holding `adapter`, when one is named."""
        mask = None if attention_mask is None else to_device(attention_mask.to(torch.int8), CPU)
        if prompts is not None and (prompts.dim() != 4 or prompts.shape[0] != self.num_blocks
                                    or prompts.shape[1] not in (1, hidden.shape[0])
                                    or prompts.shape[3] != hidden.shape[2]):
            raise ConfigError(f"prompts must be [{self.num_blocks}, 1 or batch, prompt_length, {hidden.shape[2]}], "
                              f"got {list(prompts.shape)}")
        names = [] if lora is None else list(lora.tensors())
        tensors = [] if lora is None else list(lora.tensors().values())
        keep = torch.is_grad_enabled() and (hidden.requires_grad or (prompts is not None and prompts.requires_grad)
                                            or any(t.requires_grad for t in tensors))
        scaling = None if lora is None else lora.scaling
        # the wire is bytes on the CPU: the client's tensors go there (differentiably) and the output comes back to
        # the client's device
        out = _RemoteBlocks.apply(to_device(hidden, CPU), mask, to_device(prompts, CPU), keep, self, adapter, scaling,
                                  names, *(to_device(t, CPU) for t in tensors))
        return to_device(out, hidden.device)

    def inference_session(self, max_length: int, batch_size: int | None = None, adapter: str | None = None,
                          lora: LoraWeights | None = None) -> InferenceSession:
        return InferenceSession(self, max_length, batch_size, adapter, lora)


def _sliced(tensor: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if tensor is None else tensor[rows]


Inputs = list[tuple[Hop, torch.Tensor, "list[str | None] | None"]]  # per hop: its input and its kept graphs


@dataclass(frozen=True)
class _Extras:
    """What a forward carries besides hidden states and mask: deep prompts, a named adapter, the client's LoRA."""

    prompts: torch.Tensor | None = None
    adapter: str | None = None
    lora: LoraWeights | None = None


def _forward_span(seq: RemoteSequential, start: int, end: int, hidden: torch.Tensor, mask: torch.Tensor | None,
                  extras: _Extras, keep: bool = False) -> tuple[torch.Tensor, Inputs]:
    """Run blocks [start, end) forward, retrying failed hops elsewhere; returns the output and each hop's input (and,
    with `keep`, the ids of the graphs its server keeps for the backward)."""
    def attempt() -> tuple[torch.Tensor, Inputs]:
        out, inputs = hidden, []
        for hop in seq.plan_or_wait(start, end, kind="forward", adapter=extras.adapter):
            kept: list[str | None] | None = [] if keep else None
            inputs.append((hop, out, kept))
            out = seq.hop_forward(hop, out, mask, extras.prompts, kept, extras.adapter, extras.lora)
        return out, inputs

    return seq.retry(attempt, f"forward through blocks {start}:{end}")


class _RemoteBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, mask: torch.Tensor | None, prompts: torch.Tensor | None, keep: bool,
                seq: RemoteSequential, adapter: str | None, scaling: float | None, names: list[str],
                *tensors: torch.Tensor) -> torch.Tensor:
        prompts = None if prompts is None else prompts.detach()
        lora = None
        if names:
            named = {n: t.detach() for n, t in zip(names, tensors, strict=True)}
            lora = LoraWeights.from_tensors(float(scaling), named)
        extras = _Extras(prompts, adapter, lora)
        out, inputs = _forward_span(seq, 0, seq.num_blocks, hidden.detach(), mask, extras, keep)
        ctx.seq, ctx.inputs, ctx.mask, ctx.extras, ctx.names = seq, inputs, mask, extras, names
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad = grad.contiguous()
        seq, mask, extras = ctx.seq, ctx.mask, ctx.extras
        prompts = extras.prompts
        grad_prompts = None if prompts is None else torch.zeros_like(prompts)
        grad_lora = {} if extras.lora is None else {n: torch.zeros_like(t) for n, t in extras.lora.tensors().items()}
        for hop, hidden, kept in reversed(ctx.inputs):
            grad, hop_grad = _backward_span(seq, hop, hidden, grad, mask, extras, kept, grad_lora)
            if grad_prompts is not None and hop_grad is not None:
                grad_prompts[hop.start:hop.end] = hop_grad
        return (grad, None, grad_prompts, None, None, None, None, None, *(grad_lora[n] for n in ctx.names))


def _backward_span(seq: RemoteSequential, hop: Hop, hidden: torch.Tensor, grad: torch.Tensor,
                   mask: torch.Tensor | None, extras: _Extras, kept: list[str | None] | None = None,
                   grad_lora: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients w.r.t. the input of `hop`'s blocks and their prompts (the LoRA's added into `grad_lora`); when its
    server fails, recompute the blocks on others and retry."""
    prompts = extras.prompts

    def fresh() -> dict[str, torch.Tensor] | None:  # a failed attempt adds nothing
        return None if grad_lora is None else {n: torch.zeros_like(t) for n, t in grad_lora.items()}

    def merge(part: dict[str, torch.Tensor] | None) -> None:
        if part is not None and grad_lora is not None:
            for n, t in part.items():
                grad_lora[n] += t

    part = fresh()
    try:
        result = seq.hop_backward(hop, hidden, grad, mask, prompts, kept, extras.adapter, extras.lora, part)
    except RECOVERABLE as e:
        seq.ban_failed(e)
    else:
        merge(part)
        return result

    def attempt() -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor] | None]:
        _, inputs = _forward_span(seq, hop.start, hop.end, hidden, mask, extras)  # inputs of the replacement hops
        g, g_prompts = grad, None if prompts is None else torch.zeros_like(prompts[hop.start:hop.end])
        sub_lora = fresh()
        for sub_hop, sub_hidden, _ in reversed(inputs):
            g, sub_grad = seq.hop_backward(sub_hop, sub_hidden, g, mask, prompts, None, extras.adapter, extras.lora,
                                           sub_lora)
            if g_prompts is not None and sub_grad is not None:
                g_prompts[sub_hop.start - hop.start:sub_hop.end - hop.start] = sub_grad
        return g, g_prompts, sub_lora

    g, g_prompts, sub_lora = seq.retry(attempt, f"backward through blocks {hop.start}:{hop.end}")
    merge(sub_lora)
    return g, g_prompts
