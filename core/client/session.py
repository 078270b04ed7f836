"""Inference sessions: generation with the attention caches kept on the servers, recovered by replay.

An `InferenceSession` opens a session on every server of a chain (the fastest, from peers.py; with an `adapter`, only
servers that hold it), and each step sends only the new tokens' hidden states through it, hop by hop or relayed (each
server pushing its output straight to the next, the client getting every hop's output back). Every hop keeps the inputs
it was sent, so when a server fails its blocks are rebuilt on a replacement chain by replaying that history, and the
generation goes on with the same tokens.

With `ClientConfig.verify`, a random fraction of the hops' steps is checked (verify.py) before the step's output is
used: a second server runs a stateless forward of the hop's whole history and the step through the same blocks, sent
with the step (the two servers work at once), and the new positions are compared when both answered. When a check
bans the hop's server, the blocks from that hop to the end are rebuilt on a new chain (replaying the bad hop's inputs,
since the later hops' caches hold what they computed from its outputs) and the step runs again from there, so the
tokens stay those an honest swarm gives. Steps are not relayed while checking (a server's push to the next one is
unseen).
"""

from __future__ import annotations

import logging
import secrets
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field

import torch

from ...transport.errors import ConfigError, PeerTimeout, PeerUnreachable, RelayRefused, RelayStopped, SwarmError
from ...transport.messages import (
    MAX_WAIT,
    Cancel,
    Close,
    Forward,
    LoraWeights,
    Open,
    OpenReply,
    PushTarget,
    Step,
    StepReply,
)
from ..device import CPU, to_device
from .peers import RECOVERABLE, Peers, hop_prompts, read_reply, same_shape
from .routing import Hop
from .verify import Check, verifier_of

log = logging.getLogger(__name__)

RELAY_ATTEMPTS = 3  # relayed steps in a row that may fail before a session stops trying to relay


@dataclass
class _HopSession:
    hop: Hop
    session_id: str
    # what was sent, in order: (hidden, attention mask, this hop's deep prompts)
    history: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = field(default_factory=list)


_Checked = tuple[_HopSession, Check, torch.Tensor]  # a hop, the check of its step, and the output it answered


class _RelayStopped(SwarmError):
    """A relayed step stopped at hop `index` (whose input is `hidden`): `error` says why."""

    def __init__(self, index: int, hidden: torch.Tensor, error: SwarmError):
        super().__init__(str(error))
        self.index, self.hidden, self.error = index, hidden, error


class InferenceSession:
    """Generation state on the servers: each step sends only the new tokens' hidden states through the chain.

    Every hop keeps the inputs it was sent. When a server fails (it vanished, timed out, lost the session, or is
    shutting down), it is banned for a while, a replacement chain is found for its blocks only (waiting, bounded,
    when none exists yet), the hop's history is replayed there step by step, exactly as it was first sent, so the
    rebuilt cache is the same, and the step goes on. Sampling is untouched by recovery, so the tokens are the same.
    """

    def __init__(self, peers: Peers, max_length: int, batch_size: int | None = None, adapter: str | None = None,
                 lora: LoraWeights | None = None):
        if not isinstance(max_length, int) or max_length < 1:
            raise ConfigError(f"max_length must be a positive integer, got {max_length!r}")
        self.peers, self.max_length, self.batch_size = peers, max_length, batch_size
        self.adapter = adapter  # every server of the chain runs the session's steps with this adapter
        self.lora = lora  # or with the client's own LoRA (each server gets its blocks' part at open)
        self.position = 0  # tokens the servers hold
        self.hops: list[_HopSession] = []
        self.closed = False
        self.recoveries = 0  # replacement chains built so far
        self.verifier = verifier_of(peers)  # checks a fraction of the steps on other servers
        self._no_relay = False  # set when relaying failed RELAY_ATTEMPTS steps in a row
        self._relay_failures = 0

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self.hops]

    def _open_chain(self, start: int, end: int) -> list[_HopSession]:
        batch = self.batch_size or 1
        chain = self.peers.plan_or_wait(start, end, "inference", batch * self.max_length, self.adapter)
        opened: list[_HopSession] = []
        try:
            for hop in chain:
                lora = None if self.lora is None else self.lora.sliced(hop.start, hop.end)
                request = Open(self.max_length, batch, blocks=(hop.start, hop.end), adapter=self.adapter, lora=lora)
                reply = self.peers.send(hop, request, timeout=self.peers.config.connect_timeout)
                opened.append(_HopSession(hop, read_reply(OpenReply.from_wire, reply, hop).session))
        except BaseException:
            self._close_sessions(opened)
            raise
        return opened

    def _step_hop(self, hop_session: _HopSession, hidden: torch.Tensor, mask: torch.Tensor | None,
                  start: int | None = None, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """One step on one hop; `prompts` are that hop's deep prompts (first step only). With `start`, the server
        rewinds to it first: a step half done by a broken relay runs again."""
        request = Step(hop_session.session_id, hidden, mask, prompts, start=start)
        reply = read_reply(StepReply.from_wire, self.peers.send(hop_session.hop, request), hop_session.hop)
        out = same_shape(reply.hidden, hidden, hop_session.hop, "step output")
        hop_session.history.append((hidden, mask, prompts))
        return out

    def _replacement(self, failed: _HopSession) -> list[_HopSession]:
        """New hops for the failed hop's blocks, with its history replayed into their caches."""
        def attempt() -> list[_HopSession]:
            hops = self._open_chain(failed.hop.start, failed.hop.end)
            try:
                for hidden, mask, prompts in failed.history:
                    for hop_session in hops:
                        hop = hop_session.hop
                        sub = None if prompts is None else \
                            prompts[hop.start - failed.hop.start:hop.end - failed.hop.start]
                        hidden = self._step_hop(hop_session, hidden, mask, prompts=sub)
            except BaseException:
                self._close_sessions(hops)
                raise
            return hops

        hops = self.peers.retry(attempt, f"recovering blocks {failed.hop.start}:{failed.hop.end}")
        self.recoveries += 1
        log.info("recovered blocks %d:%d on %s (replayed %d steps)", failed.hop.start, failed.hop.end,
                 ", ".join(h.hop.peer for h in hops), len(failed.history))
        return hops

    def step(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
             prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Run new tokens' hidden states [batch, new, hidden] through every hop; returns the last hop's output.

        `prompts` [blocks, batch or 1, prompt_length, hidden] are deep prompts, one per block, added at the first
        positions: only the first step of a session may carry them.
        """
        if self.closed:
            raise SwarmError("this inference session is closed")
        batch, new, _ = hidden.shape
        if self.batch_size is not None and self.hops and batch != self.batch_size:
            raise ConfigError(f"the session was opened for batch size {self.batch_size}, this step has {batch}")
        if prompts is not None and self.position != 0:
            raise ConfigError("deep prompts may only come with the first step of an inference session")
        if self.position + new > self.max_length:
            raise ConfigError(f"the session holds {self.position} tokens; {new} more would pass its max_length "
                              f"{self.max_length}: open it with a larger max_length")
        if not self.hops:
            self.batch_size = batch
            self.hops = self.peers.retry(lambda: self._open_chain(0, self.peers.num_blocks), "opening a session")
            log.info("inference session through %s",
                     " -> ".join(f"{h.peer} [{h.start}:{h.end})" for h in self.route))
        device = hidden.device  # the client's own device; the wire and the history are on the CPU
        mask = None if attention_mask is None else to_device(attention_mask.to(torch.int8), CPU)
        prompts = None if prompts is None else to_device(prompts.detach(), CPU)
        out, i, failures = to_device(hidden.detach(), CPU), 0, 0
        while True:
            out, failures, checks = self._run(i, out, mask, prompts, failures)
            bad = self._first_wrong(checks)
            if bad is None:
                break
            # hop `bad` answered wrong outputs (its server is banned now), and the later hops' caches hold what
            # they computed from its outputs: this step's entries of those hops are dropped, blocks from the bad
            # hop's start to the end are rebuilt on a new chain by replaying the bad hop's inputs through it, and
            # the step runs again from there
            failures += 1
            if failures > self.peers.config.max_retries:
                raise SwarmError(f"giving up after {failures - 1} recoveries in one step")
            i = self._index(bad)
            out = bad.history[-1][0]
            for hop_session in self.hops[i:]:
                del hop_session.history[-1]
            rest = _HopSession(Hop(bad.hop.peer, bad.hop.start, self.hops[-1].hop.end), bad.session_id,
                               [(h, m, None) for h, m, _ in bad.history])
            deep = [h.history[0][2] for h in self.hops[i:] if h.history and h.history[0][2] is not None]
            if rest.history and deep:  # the deep prompts of all those blocks come with the first step
                rest.history[0] = (*rest.history[0][:2], torch.cat(deep))
            self._close_sessions(self.hops[i:])
            self.hops[i:] = self._replacement(rest)
        self.position += new
        return to_device(out, device)

    def _run(self, i: int, out: torch.Tensor, mask: torch.Tensor | None, prompts: torch.Tensor | None,
             failures: int) -> tuple[torch.Tensor, int, list[_Checked]]:
        """This step from hop `i` (whose input is `out`) to the end, recovering failed servers; returns the output,
        the updated failure count, and the checks started (verify)."""
        checks: list[_Checked] = []
        # no relay while checking: the client sees what a server answers, not what it pushes to the next one, so a
        # server could answer honestly and push garbage, and the check of the next hop would blame that one
        hop_by_hop = not self.peers.config.relay or self._no_relay or self.verifier.fraction > 0
        while i < len(self.hops):
            try:
                if not hop_by_hop and i + 1 < len(self.hops):
                    out, i = self._relayed(i, out, mask, prompts)
                    self._relay_failures = 0
                else:
                    hop_session, sub_prompts = self.hops[i], hop_prompts(prompts, self.hops[i].hop)
                    check = self._maybe_check(hop_session, out, mask, sub_prompts)  # runs alongside the step
                    out = self._step_hop(hop_session, out, mask, start=self.position, prompts=sub_prompts)
                    if check is not None:
                        checks.append((hop_session, check, out))
                    i += 1
            except _RelayStopped as stopped:
                out, i, error = stopped.hidden, stopped.index, stopped.error
                if isinstance(error, (RelayStopped, RelayRefused)):
                    # e.g. a server does not know the next one (yet, or any more, when it just died): this step
                    # goes on hop by hop; after RELAY_ATTEMPTS such steps in a row, the whole session does
                    hop_by_hop, self._relay_failures = True, self._relay_failures + 1
                    self._no_relay = self._relay_failures >= RELAY_ATTEMPTS
                    log.warning("relay failed (%s); stepping hop by hop%s", error,
                                " from now on" if self._no_relay else " for this step")
                elif isinstance(error, RECOVERABLE):
                    failures = self._recover(i, error, failures)
                else:
                    raise error from None
            except RECOVERABLE as e:
                failures = self._recover(i, e, failures)
        return out, failures, checks

    def _maybe_check(self, hop_session: _HopSession, hidden: torch.Tensor, mask: torch.Tensor | None,
                     prompts: torch.Tensor | None) -> Check | None:
        """With probability `verify`, start checking the step `hop_session` is about to run on `hidden`: a stateless
        forward of the hop's whole history and this step on another server of its blocks, sent now so that it runs
        while the hop's own server steps."""
        verifier = self.verifier
        if not verifier.draw():
            return None
        history, hop = [*hop_session.history, (hidden, mask, prompts)], hop_session.hop
        whole = torch.cat([h for h, _, _ in history], dim=1)
        batch, length = whole.shape[:2]
        if batch * length > self.peers.config.max_request_tokens:  # too long for one forward request
            verifier.count(skipped=1)
            return None
        whole_mask = None
        if any(m is not None for _, m, _ in history):
            whole_mask = torch.cat([torch.ones(h.shape[:2], dtype=torch.int8) if m is None else m
                                    for h, m, _ in history], dim=1)
        lora = None if self.lora is None else self.lora.sliced(hop.start, hop.end)
        request = Forward(whole, whole_mask, history[0][2], blocks=(hop.start, hop.end), adapter=self.adapter,
                          lora=lora)
        new = hidden.shape[1]
        return verifier.start(hop, request, columns=new, mask=mask, adapter=self.adapter)

    def _first_wrong(self, checks: list[_Checked]) -> _HopSession | None:
        """Wait for this step's checks; the first hop (in chain order) whose server was banned for a wrong output."""
        wrong = [h for h, check, out in checks if not self.verifier.judge(check, out)]  # each judged: each may ban
        wrong = [h for h in wrong if any(h is x for x in self.hops)]
        return min(wrong, key=self._index) if wrong else None

    def _index(self, hop_session: _HopSession) -> int:
        return next(k for k, h in enumerate(self.hops) if h is hop_session)

    def _recover(self, i: int, error: BaseException, failures: int) -> int:
        """Replace hop `i` after its server failed; returns the updated failure count of this step."""
        failures += 1
        if failures > self.peers.config.max_retries:
            raise SwarmError(f"giving up after {failures - 1} recoveries in one step: {error}") from error
        hop_session = self.hops[i]
        self.peers.ban(hop_session.hop.peer, error)
        if not isinstance(getattr(error, "error", error), (PeerUnreachable, PeerTimeout)):
            self._close_sessions([hop_session])  # it still answers: free its cache now
        self.hops[i:i + 1] = self._replacement(hop_session)
        return failures

    def _relayed(self, i: int, hidden: torch.Tensor, mask: torch.Tensor | None, prompts: torch.Tensor | None,
                 ) -> tuple[torch.Tensor, int]:
        """One step from hop `i` to the end, servers passing it along; returns the output and the next hop index.

        Every server of the chain gets its request at once. The first gets the hidden states; each later one waits
        for its input, pushed by the server before it, and every server answers with its output, which is the next
        hop's history. On a failure at hop k, the requests still waiting are cancelled and the step goes on from k.
        """
        chain, ticket = self.hops[i:], secrets.token_hex(8)
        timeout = self.peers.config.request_timeout
        sub_prompts = [hop_prompts(prompts, hop_session.hop) for hop_session in chain]
        pending: list[Future] = []  # the requests of hops 1.. (hop 0's is sent from here, after them)
        for k, hop_session in enumerate(chain):
            push = None
            if k + 1 < len(chain):
                after = chain[k + 1]
                push = PushTarget(after.hop.peer, after.session_id, f"{ticket}.{k + 1}",
                                  self.peers.push_codec(hop_session.hop.peer, after.hop.peer))
            if k == 0:
                first = Step(hop_session.session_id, hidden, mask, sub_prompts[0], start=self.position, push=push)
                continue
            # it waits for the servers before it, each bounded by the request timeout
            wait = min(MAX_WAIT, timeout * k)
            request = Step(hop_session.session_id, None, mask, sub_prompts[k], start=self.position,
                           ticket=f"{ticket}.{k}", wait=wait, push=push)
            pending.append(self.peers.submit(hop_session.hop, request, timeout + wait, channel="relay"))
        x = hidden
        for k, hop_session in enumerate(chain):
            try:
                reply = self.peers.send(hop_session.hop, first) if k == 0 else pending[k - 1].result()
                out = same_shape(read_reply(StepReply.from_wire, reply, hop_session.hop).hidden, hidden,
                                 hop_session.hop, "step output")
            except BaseException as e:
                self._cancel(chain[k + 1:], pending[k:], ticket, k + 1)
                if not isinstance(e, SwarmError):
                    raise
                raise _RelayStopped(i + k, x, e) from e
            hop_session.history.append((x, mask, sub_prompts[k]))
            x = out
        return x, len(self.hops)

    def _cancel(self, waiting: list[_HopSession], pending: list[Future], ticket: str, first: int) -> None:
        """Cancel the relayed requests that wait for an input that will not come, and let their calls end."""
        for k, (hop_session, future) in enumerate(zip(waiting, pending, strict=True), start=first):
            if future.done():
                continue
            try:
                self.peers.send(hop_session.hop, Cancel(hop_session.session_id, f"{ticket}.{k}"),
                                timeout=self.peers.config.connect_timeout)
            except SwarmError as e:  # gone too: its own call ends with that
                log.debug("cancelling a relayed step on %s failed: %s", hop_session.hop.peer, e)
        wait_futures(pending, timeout=self.peers.config.request_timeout)

    def rewind(self, position: int) -> None:
        """Forget the tokens after the first `position`, which must be where a step began: the next step goes on
        from there (every step tells the servers its start position, and they drop what their caches hold beyond
        it). Used to drop an interrupted or unwanted continuation, e.g. a chat answer stopped with Ctrl-C."""
        if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position <= self.position:
            raise ConfigError(f"can only rewind to a position in [0, {self.position}], got {position!r}")
        keep = []
        for hop_session in self.hops:
            count, total = 0, 0
            for hidden, _, _ in hop_session.history:
                if total >= position:
                    break
                total, count = total + hidden.shape[1], count + 1
            if total != position:
                raise ConfigError(f"cannot rewind to {position}: no step of this session began there")
            keep.append(count)
        for hop_session, count in zip(self.hops, keep, strict=True):
            del hop_session.history[count:]  # a step half done when interrupted goes too
        self.position = position

    def _close_sessions(self, hops: list[_HopSession]) -> None:
        for hop_session in hops:
            try:
                self.peers.send(hop_session.hop, Close(hop_session.session_id), timeout=1.0)
            except SwarmError as e:  # the server may be gone; its session expires on its own
                log.debug("closing a session on %s failed: %s", hop_session.hop.peer, e)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._close_sessions(self.hops)

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
