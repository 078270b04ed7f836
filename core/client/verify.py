"""Checking servers' work: a random fraction of remote computations is run again on a second server and compared.

With `ClientConfig.verify = F` (`swarm chat --verify F`, `swarm tune --verify F`), each remote forward request (the
training path, sequence.py) and each hop of each inference step (session.py) is checked with probability F:
- a forward request is sent as it is (without keeping a graph) to another server that holds the same blocks with the
  same weight quantization (a record's `quant`: servers of different quantizations compute different functions),
  at the same time as the real one (a request names the blocks it wants within a server's span), so a check costs
  that server the compute and the client almost no latency;
- a session's step on one hop is checked with a stateless forward of the hop's whole history plus the new step
  (same blocks, deep prompts, adapter, client LoRA); the new positions of its output are compared with what the
  session's server answered. The check is sent with the step (both servers work at once) and judged before the
  step's output is used, so a wrong output never reaches the sampler: generate() never has to take back a token it
  already streamed. The price is latency on checked steps: the check is a forward of the whole history, not one
  token, and the step waits for it (see benchmarks/bench_verify.py).

Outputs are compared by relative norm difference, ||a - b|| / max(||a||, ||b||), over the real (unpadded) positions,
against a tolerance set by the dtypes and weight quantization involved (`tolerance`: the loosest of the client's and
both servers'), plus what the compression of the hidden states on the wire adds (`COMPRESSION_TOLERANCE`: the inputs
and outputs of both servers may travel compressed, so a server may lie by that much more unseen). Two honest
servers of one dtype differ only by the order of floating-point sums (batching, chunked
prefill, a step's cache against a whole-sequence forward): ~1e-6 in float32, ~1e-3..1e-2 in 16-bit floats, more with
8-bit and 4-bit weights (whose kernels and outlier handling differ by hardware). Measured on the real demo model
(SmolLM2-135M, one hop of 15 blocks, float32, this CPU): an int8 server's session steps and a forward of the same
tokens differ by up to 0.05 (LLM.int8 picks its 16-bit outlier columns over the tokens of a pass), nf4 ones by 1e-6;
but an nf4 hop differs from the same blocks in float32 by 0.22 and an int8 one by 0.07, as much as a liar might
perturb: so a check is never made across quantizations (with no second server of the checked one's quantization, it is
skipped), and the quantization tolerances below are those of two servers of one quantization.

On a mismatch the client asks a third server of those blocks, when there is one, and bans the one the other two
outvote (the checker itself, when it is the odd one out). With only two servers (or no majority) it bans the checked
server: it cannot tell which of the two lied, and only the checked server's output would be used, so dropping it is
the choice that keeps results correct. Its limit: a dishonest checker can frame an honest server when no third server
exists; a third server turns that into a vote the liar loses (and gets banned for), and checkers are drawn at random,
so a liar must be drawn to frame anyone. A ban (`Peers.distrust`) lasts `verify_ban_time` (a day by default), covers
the server's address and the peer ids of its signed records, and is not forgiven when it answers again. The session
then replaces the server (replaying its history on another) and runs the step again from that hop; a training
forward is retried on another route. Checks, mismatches, bans, checks without a second server and checks whose checker
failed are counted in `Verifier.stats`.

What it does not catch: a server that perturbs outputs by less than the tolerance, that lies only in backward passes
(gradients are not checked) or only on requests it can tell are not checks (a session's check is a long stateless
forward; its steps are one-token steps), and servers that collude (a checker and a checked server that agree). With a
fraction below 1, unchecked steps of a liar before the one that caught it may already have given wrong tokens (the
rebuild makes the later ones right); with 1, every step is checked before it is used. Blocks served by one server
only cannot be checked (counted as skipped). A session steps hop by hop while checking, never relayed: the client sees
what a server answers, not what it pushes to the next server, so a liar could answer honestly, push garbage, and have
the next server blamed.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import weakref
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, replace

import torch

from ...transport.errors import SwarmError
from ...transport.messages import Forward, ForwardReply
from ...transport.records import ServerRecord
from .peers import Peers, read_reply, same_shape
from .routing import Hop

log = logging.getLogger(__name__)

# relative norm differences two honest servers stay within, by compute dtype and by weight quantization
DTYPE_TOLERANCE = {"float64": 1e-3, "float32": 1e-3, "float16": 2e-2, "bfloat16": 5e-2}
QUANT_TOLERANCE = {"none": 0.0, "int8": 0.1, "8bit": 0.1, "nf4": 0.2, "fp4": 0.2, "4bit": 0.2}
# what compressed hidden states add (the checked input and both outputs travel compressed; measured in
# benchmarks/bench_compression.py: a relative difference of ~1e-4 for float16, ~1e-3 for bfloat16, ~1e-2 for int8)
COMPRESSION_TOLERANCE = {"none": 0.0, "float16": 5e-3, "bfloat16": 2e-2, "int8": 8e-2}
UNKNOWN_DTYPE_TOLERANCE = 5e-2  # a dtype this table does not know: as loose as bfloat16
UNKNOWN_QUANT_TOLERANCE = 0.2  # a quantization this table does not know: as loose as 4-bit
MIXED_QUANT_TOLERANCE = 0.25  # two servers of different quantizations (or one quantized, one not)


class VerifyMismatch(SwarmError):
    """A server's output did not match what other servers of the same blocks computed."""

    code = "verify_mismatch"


@dataclass
class VerifyStats:
    checks: int = 0  # computations sent to a second server
    mismatches: int = 0  # checks whose outputs differed by more than the tolerance
    bans: int = 0  # servers banned for wrong outputs
    skipped: int = 0  # computations drawn for a check that no other server could run
    failed: int = 0  # checks whose checker did not answer (nothing learned)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def tolerance(dtypes: Iterable[str], quants: Iterable[str], codecs: Iterable[str] = ()) -> float:
    """The relative norm difference allowed between outputs computed in `dtypes` with weights quantized as `quants`,
    that travelled compressed with `codecs` (their errors add to the dtypes')."""
    quants = [q or "none" for q in quants]
    tol = max((DTYPE_TOLERANCE.get(d, UNKNOWN_DTYPE_TOLERANCE) for d in dtypes), default=UNKNOWN_DTYPE_TOLERANCE)
    tol += max((COMPRESSION_TOLERANCE.get(c, COMPRESSION_TOLERANCE["int8"]) for c in codecs), default=0.0)
    tol = max([tol, *(QUANT_TOLERANCE.get(q, UNKNOWN_QUANT_TOLERANCE) for q in quants)])
    if len(set(quants)) > 1:
        tol = max(tol, MIXED_QUANT_TOLERANCE)
    return tol


def relative_difference(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """||a - b|| / max(||a||, ||b||) over the positions where `mask` [batch, length] is 1 (all without one); inf when
    either holds a NaN or an infinity."""
    a, b = a.detach().float(), b.detach().float()
    if mask is not None:
        keep = mask.bool()
        a, b = a[keep], b[keep]
    if a.numel() == 0:
        return 0.0
    diff = float((a - b).norm())
    scale = max(float(a.norm()), float(b.norm()))
    if not (math.isfinite(diff) and math.isfinite(scale)):
        return math.inf
    return 0.0 if diff == 0.0 else diff / max(scale, 1e-30)


@dataclass(frozen=True)
class Check:
    """One computation sent to a second server: `request` (a stateless forward) ran on `checker`; the last `columns`
    positions of its output are compared with what `hop`'s server answered, at the positions `mask` marks."""

    hop: Hop
    checker: Hop
    request: Forward
    future: Future
    columns: int
    mask: torch.Tensor | None
    adapter: str | None


class Verifier:
    """Draws which computations to check, sends them to a second server, judges, and bans (through `peers`)."""

    def __init__(self, peers: Peers, rng: random.Random | None = None):
        self.peers = weakref.proxy(peers)  # the peers hold their verifier: no reference cycle keeps them alive
        self.fraction = float(peers.config.verify)
        self.stats = VerifyStats()
        self._rng = rng or random.Random()
        self._lock = threading.Lock()  # guards stats and the generator (requests may run on several threads)

    def count(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self.stats, name, getattr(self.stats, name) + n)

    def draw(self) -> bool:
        """Whether to check the next computation (never with a fraction of 0: then no check is ever sent)."""
        if self.fraction <= 0.0:
            return False
        with self._lock:
            return self._rng.random() < self.fraction

    def _other(self, hop: Hop, adapter: str | None, exclude: set[str]) -> Hop | None:
        """Another usable server holding all of `hop`'s blocks (and `adapter`) with the weight quantization of `hop`'s
        server, at random; None when there is none."""
        records = self._records()
        quant = _quant(records.get(hop.peer))
        candidates = sorted({s.peer for s in self.peers.spans(adapter)
                             if s.start <= hop.start and hop.end <= s.end and s.peer not in exclude
                             and _quant(records.get(s.peer)) == quant})
        if not candidates:
            return None
        with self._lock:
            return Hop(self._rng.choice(candidates), hop.start, hop.end)

    def start(self, hop: Hop, request: Forward, columns: int | None = None, mask: torch.Tensor | None = None,
              adapter: str | None = None) -> Check | None:
        """Send `request` (what `hop`'s server is asked, as a stateless forward) to another server of its blocks, in
        the background; None when no other server holds them. `mask` marks the compared positions."""
        checker = self._other(hop, adapter, {hop.peer})
        if checker is None:
            self.count(skipped=1)
            log.debug("no second server holds blocks %d:%d of %s: not checked", hop.start, hop.end, hop.peer)
            return None
        self.count(checks=1)
        request = replace(request, keep=False)
        columns = request.hidden.shape[1] if columns is None else columns
        return Check(hop, checker, request, self.peers.submit(checker, request), columns, mask, adapter)

    def maybe(self, hop: Hop, request: Forward, columns: int | None = None, mask: torch.Tensor | None = None,
              adapter: str | None = None) -> Check | None:
        """`start` a check of `request` with probability `fraction`."""
        return self.start(hop, request, columns, mask, adapter) if self.draw() else None

    def judge(self, check: Check, got: torch.Tensor) -> bool:
        """Whether `got` (what the checked server answered) can be used: True when the checker agrees (or could not
        tell: it failed), or when a third server sides with the checked one; False when the checked server is banned.
        """
        try:
            expected = self._output(check.checker, check.future.result(), check)
        except SwarmError as e:
            self.count(failed=1)
            self.peers.ban_failed(e)
            log.debug("checking %s on %s failed: %s", check.hop.peer, check.checker.peer, e)
            return True
        tol = self._tolerance(check, got, (check.hop.peer, check.checker.peer))
        diff = relative_difference(got, expected, check.mask)
        if diff <= tol:
            return True
        self.count(mismatches=1)
        log.warning("blocks %d:%d: %s and %s disagree (relative difference %.3g, tolerance %.3g)", check.hop.start,
                    check.hop.end, self._name(check.hop.peer), self._name(check.checker.peer), diff, tol)
        return self._settle(check, got, expected)

    def _settle(self, check: Check, got: torch.Tensor, expected: torch.Tensor) -> bool:
        """A third server decides, when there is one; else (or without a majority) the checked server is banned."""
        third = self._other(check.hop, check.adapter, {check.hop.peer, check.checker.peer})
        if third is not None:
            try:
                decider = self._output(third, self.peers.send(third, check.request), check)
            except SwarmError as e:
                self.peers.ban_failed(e)
                decider = None
            if decider is not None:
                tol = self._tolerance(check, got, (check.hop.peer, check.checker.peer, third.peer))
                with_checked = relative_difference(got, decider, check.mask) <= tol
                with_checker = relative_difference(expected, decider, check.mask) <= tol
                if with_checked and with_checker:
                    log.warning("blocks %d:%d: %s agrees with both: no ban", check.hop.start, check.hop.end,
                                self._name(third.peer))
                    return True
                if with_checked:
                    self._ban(check.checker.peer, f"outvoted by {self._name(check.hop.peer)} and "
                                                  f"{self._name(third.peer)} on blocks {check.hop.start}:"
                                                  f"{check.hop.end}")
                    return True
                if with_checker:
                    self._ban(check.hop.peer, f"outvoted by {self._name(check.checker.peer)} and "
                                              f"{self._name(third.peer)} on blocks {check.hop.start}:{check.hop.end}")
                    return False
        reason = "no third server to decide" if third is None else "no majority among three servers"
        self._ban(check.hop.peer, f"differs from {self._name(check.checker.peer)} on blocks {check.hop.start}:"
                                  f"{check.hop.end}; {reason}")
        return False

    def _ban(self, peer: str, reason: str) -> None:
        self.count(bans=1)
        self.peers.distrust(peer, reason)

    def _output(self, hop: Hop, reply: object, check: Check) -> torch.Tensor:
        """The compared part of a checker's forward reply (a malformed one is a SwarmError naming it)."""
        out = read_reply(ForwardReply.from_wire, reply, hop).hidden
        return same_shape(out, check.request.hidden, hop, "forward output")[:, -check.columns:]

    def _tolerance(self, check: Check, got: torch.Tensor, peers: Iterable[str]) -> float:
        records = self._records()
        found = [records[p] for p in peers if p in records]
        dtypes = [str(got.dtype).removeprefix("torch."), *(r.dtype for r in found)]
        codecs = [self.peers.codec_for(p) for p in peers]  # what the inputs and outputs travelled in
        return tolerance(dtypes, [r.quant for r in found] or ["none"], codecs)

    def _records(self) -> dict[str, ServerRecord]:
        return {r.addresses[0]: r for r in self.peers.discovery.records(self.peers._model_filter)}

    def _name(self, peer: str) -> str:
        """An endpoint with its server's peer id (as its record announces it), for logs."""
        record = self._records().get(peer)
        return peer if record is None else f"{peer} ({record.peer_id[:16]})"


def _quant(record: ServerRecord | None) -> str | None:
    """A server's weight quantization as its record announces it (None: no record known)."""
    return None if record is None else record.quant


def verifier_of(peers: Peers) -> Verifier:
    """The verifier `peers` carries (a RemoteSequential has one), made and attached on first use otherwise."""
    verifier = getattr(peers, "verifier", None)
    if not isinstance(verifier, Verifier):
        verifier = Verifier(peers)
        peers.verifier = verifier  # type: ignore[attr-defined]
    return verifier
