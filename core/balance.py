"""Where a server should sit in the swarm, and when it should move: pure policies over a snapshot of the records.

A model's throughput is limited by its least-served block (the *bottleneck*: the minimum over blocks of the summed
throughput of the servers holding that block), so every decision here aims at raising that minimum:
- `choose_span`: the span a server (new, or looking for a better place) should take. Petals' rule covers the window
  whose own throughputs are lowest; this one looks at the whole model after the server is added and takes the window
  that leaves the best sorted vector of per-block throughputs (the highest bottleneck, then the highest second-lowest
  block, and so on: "leximin"). Ties, as in an empty swarm, are broken by a hash of the server's peer id, so servers
  that start together with the same snapshot spread out instead of piling onto the same span; a placed server keeps
  its span when no other is strictly better.
- `plan_move`: whether moving one server would raise the bottleneck enough (Petals' `balance_quality` knob), judged
  after simulating the others' best responses (each in turn takes its best span given the rest, under the same rules).
  A move is refused when the server is the last one holding some block (its move would leave the block uncovered
  while it loads), and when the move alone would lower the bottleneck (a move must not bet on others following).
- `Rebalancer`: the small stateful part a server runs every (jittered) period: a move is returned only when the same
  target comes out of `confirmations` checks in a row (hysteresis against gossip noise) and the last move, or the
  start, is at least `min_interval` seconds old. It takes an injectable clock.
- `optimum`: the best bottleneck the same servers could reach. Exact for small cases (every placement is tried when
  there are at most EXACT_PLACEMENTS of them); otherwise an upper bound (see `_upper_bound`), so a quality measured
  against it errs low. `best_arrangement` is the other side: a good placement found by greedy joins and rounds of
  best responses, a lower bound of the optimum. `balance_quality` compares the bottleneck now with the better of the
  two that is reachable: the current bottleneck over what the balancer could reach (1.0 when it cannot do better).

Only records whose signature verified take part (`servers_from_records`): a forged or unsigned record must not be able
to move honest servers. Spans are half-open `[start, end)`; a ServerLoad with `end == start` is not placed yet.
Throughputs are the announced tokens/s, comparable between servers; negative ones count as 0.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..transport.keys import KEY_ID, verify
from ..transport.records import ServerRecord, signed_bytes
from .coverage import SERVING_STATES

EXACT_PLACEMENTS = 4096  # `optimum` tries every placement when there are at most this many
RESPONSE_ROUNDS = 2  # rounds of the others' best responses that `plan_move` simulates
_TIE = 1e-9  # throughputs closer than this, relative to the largest, count as equal
UNMEASURED = 1e-6  # a server announcing no throughput counts as this share of the largest, for choices only


@dataclass(frozen=True)
class ServerLoad:
    """One server as the policies see it."""

    peer_id: str
    start: int  # first block held
    end: int  # one past the last block held; end == start: not placed yet
    throughput: float  # announced tokens/s, comparable between servers
    online: bool = True  # serving now; False while joining (loading): it counts for throughput, not as a holder

    @property
    def length(self) -> int:
        return max(self.end - self.start, 0)


@dataclass(frozen=True)
class Move:
    """A span a server should move to, and why."""

    start: int
    end: int
    gain: float  # share of the expected bottleneck the move adds: (after - before) / after, 1.0 when it fills a gap
    reason: str  # one line for logs and `info`
    before: float = 0.0  # the swarm's bottleneck now (tokens/s)
    after: float = 0.0  # the bottleneck expected once this server (and the others' best responses) moved


@dataclass(frozen=True)
class BalanceConfig:
    balance_quality: float = 0.9  # move when bottleneck_now < balance_quality * bottleneck_after (Petals: 0.75)
    min_interval: float = 60.0  # seconds between two moves of one server (and from its start to its first move)
    confirmations: int = 2  # the same move must come out of this many checks in a row (hysteresis)


# ---------------------------------------------------------------------------------------------------- snapshots


@lru_cache(maxsize=8192)
def _verified(record: ServerRecord) -> bool:
    """Whether `record` carries its owner's valid signature (checked again here, once per record version: a record
    is checked when read from the wire, but one built in memory could carry any signature)."""
    return bool(record.signature) and bool(KEY_ID.fullmatch(record.peer_id)) and verify(
        record.peer_id, signed_bytes(record), record.signature)


def servers_from_records(records: Iterable[ServerRecord], model: str) -> list[ServerLoad]:
    """The servers of `model` that the policies count: records whose signature verifies (unsigned legacy records
    are ignored, so that a forged one cannot move honest servers) whose state is online or joining (a draining server
    counts as gone). Sorted by peer id, one entry per peer."""
    chosen: dict[str, ServerLoad] = {}
    for r in records:
        if r.model != model or r.state not in SERVING_STATES or not _verified(r):
            continue
        throughput = r.throughput if r.throughput > 0 and math.isfinite(r.throughput) else 0.0
        chosen[r.peer_id] = ServerLoad(r.peer_id, r.start, r.end, throughput, r.state == "online")
    return [chosen[k] for k in sorted(chosen)]


def _speed(throughput: float) -> float:
    return throughput if throughput > 0 and math.isfinite(throughput) else 0.0


def _floored(servers: Iterable[ServerLoad], throughput: float = 0.0) -> tuple[list[ServerLoad], float]:
    """`servers`, and `throughput`, with a server that announces no throughput (not measured yet) counted as a
    tiny one (UNMEASURED times the largest, or UNMEASURED), so that the choices still see which blocks it holds: a
    swarm of unmeasured servers still covers its gaps first."""
    servers = list(servers)
    floor = UNMEASURED * max([_speed(s.throughput) for s in servers] + [_speed(throughput), 1.0])
    return ([s if _speed(s.throughput) > 0 else ServerLoad(s.peer_id, s.start, s.end, floor, s.online)
             for s in servers], max(_speed(throughput), floor))


def _profile(servers: Iterable[ServerLoad], num_blocks: int, skip: str | None = None) -> np.ndarray:
    """Summed throughput per block (spans clipped to the model), without the server `skip`. A block that no server
    holds is exactly 0 and none is negative (running sums of differences leave rounding crumbs such as 1e-13)."""
    diff = np.zeros(num_blocks + 1)
    held = np.zeros(num_blocks + 1, dtype=np.int64)
    for s in servers:
        if s.peer_id == skip:
            continue
        a, b = max(s.start, 0), min(s.end, num_blocks)
        if a < b:
            t = _speed(s.throughput)
            diff[a] += t
            diff[b] -= t
            held[a] += 1
            held[b] -= 1
    profile = np.maximum(np.cumsum(diff[:num_blocks]), 0.0)
    profile[np.cumsum(held[:num_blocks]) == 0] = 0.0
    return profile


def _counts(servers: Iterable[ServerLoad], num_blocks: int, skip: str | None = None) -> np.ndarray:
    """Number of online servers holding each block, without the server `skip`."""
    diff = np.zeros(num_blocks + 1, dtype=np.int64)
    for s in servers:
        if s.peer_id == skip or not s.online:
            continue
        a, b = max(s.start, 0), min(s.end, num_blocks)
        if a < b:
            diff[a] += 1
            diff[b] -= 1
    return np.cumsum(diff[:num_blocks])


def block_throughputs(servers: Iterable[ServerLoad], num_blocks: int) -> list[float]:
    """The summed throughput of the servers holding each block."""
    return [float(x) for x in _profile(servers, max(num_blocks, 0))]


def bottleneck(servers: Iterable[ServerLoad], num_blocks: int) -> float:
    """Throughput of the least-served block (0 when a block has no server, or the model no block)."""
    profile = _profile(servers, max(num_blocks, 0))
    return float(profile.min()) if profile.size else 0.0


# ---------------------------------------------------------------------------------------------------- choosing


@lru_cache(maxsize=256)
def _windows(num_blocks: int, length: int) -> np.ndarray:
    """0/1 matrix: row s has ones on blocks [s, s + length)."""
    idx = np.arange(num_blocks)
    starts = np.arange(num_blocks - length + 1)[:, None]
    mask = ((idx >= starts) & (idx < starts + length)).astype(float)
    mask.setflags(write=False)
    return mask


def _quantize(rows: np.ndarray) -> np.ndarray:
    """Throughputs as integers in units of _TIE times the largest, so that values equal up to rounding are equal."""
    scale = float(np.abs(rows).max()) if rows.size else 0.0
    if scale <= 0:
        return np.zeros(rows.shape, dtype=np.int64)
    return np.rint(rows * (1.0 / (scale * _TIE))).astype(np.int64)


def _best_starts(base: np.ndarray, length: int, throughput: float,
                 covering: tuple[int, int] | None = None) -> list[int]:
    """The starts whose window, with `throughput` added to `base`, leaves the best sorted per-block vector (leximin),
    all of them when several tie. With `covering` (a, b), only windows that hold all of blocks [a, b)."""
    if throughput <= 0:  # a server without throughput still goes where it is needed most
        throughput = UNMEASURED * (float(base.max()) or 1.0)
    rows = _quantize(base[None, :] + throughput * _windows(base.size, length))
    allowed = np.arange(rows.shape[0])
    if covering is not None:
        a, b = covering
        allowed = allowed[(allowed <= a) & (allowed + length >= b)]
        if allowed.size == 0:
            return []
    lows = rows[allowed].min(axis=1)
    best = allowed[lows == lows.max()]  # the highest bottleneck first, then the next lowest blocks...
    if best.size > 1:  # big-endian bytes of non-negative integers compare as the sorted vectors do
        ordered = [row.tobytes() for row in np.sort(np.maximum(rows[best], 0), axis=1).astype(">i8")]
        top = max(ordered)
        best = np.array([int(x) for x, key in zip(best, ordered, strict=True) if key == top])
    return [int(x) for x in best]


def _pick(peer_id: str, choices: Sequence[int]) -> int:
    """One of `choices`, the same for the same peer id on every machine, spread over peer ids."""
    digest = hashlib.sha256(peer_id.encode()).digest()
    return choices[int.from_bytes(digest[:8], "big") % len(choices)]


def choose_span(servers: Iterable[ServerLoad], num_blocks: int, length: int, throughput: float,
                me: str = "") -> tuple[int, int]:
    """The span of `length` blocks (clipped to the model) that server `me`, with `throughput`, should take given the
    other servers (`me` is left out of `servers` first): the window that leaves the best sorted vector of per-block
    throughputs. Among equally good windows, `me`'s current span when it is one, else one picked by `me`'s id."""
    if num_blocks <= 0:
        raise ValueError("a model has at least one block")
    servers, throughput = _floored(servers, throughput)
    length = min(max(length, 1), num_blocks)
    starts = _best_starts(_profile(servers, num_blocks, skip=me), length, throughput)
    for s in servers:
        if me and s.peer_id == me and s.length == length and s.start in starts:
            return s.start, s.end
    start = _pick(me, starts)
    return start, start + length


# ---------------------------------------------------------------------------------------------------- optimum


def _pairs(throughputs: Sequence[float], lengths: Sequence[int], num_blocks: int) -> list[tuple[float, int]]:
    if len(throughputs) != len(lengths):
        raise ValueError("one length per throughput")
    return [(_speed(t), min(int(n), num_blocks)) for t, n in zip(throughputs, lengths, strict=True)
            if _speed(t) > 0 and n > 0]


def _upper_bound(pairs: list[tuple[float, int]], num_blocks: int) -> float:
    """An upper bound of the best bottleneck. For any k blocks spaced d apart, a window of length n holds at most
    min(k, (n - 1) // d + 1) of them, so the least of those k blocks gets at most
    sum_i t_i * min(k, (n_i - 1) // d + 1) / k; d = 1, k = num_blocks is the total capacity sum_i t_i n_i / B.
    Then the bottleneck is a sum of some servers' throughputs: when few distinct values make that cheap to list, the
    largest such sum under the bound."""
    t = np.array([p[0] for p in pairs])
    n = np.array([p[1] for p in pairs])
    bound = math.inf
    for d in range(1, num_blocks):
        reach = (n - 1) // d + 1
        for k in range(1, (num_blocks - 1) // d + 2):
            bound = min(bound, float((t * np.minimum(reach, k)).sum()) / k)
    if num_blocks == 1:
        bound = float(t.sum())
    return _subset_sum_at_most([p[0] for p in pairs], bound)


def _subset_sum_at_most(values: Sequence[float], cap: float, limit: int = 2048) -> float:
    """The largest sum of a sub-multiset of `values` not above `cap` (plus rounding); `cap` itself when listing the
    sums would take more than about `limit` of them."""
    distinct: dict[float, int] = {}
    for v in values:
        distinct[v] = distinct.get(v, 0) + 1
    if len(distinct) > 16:
        return cap
    slack = cap * 1e-9
    sums = {0.0}
    for v, count in distinct.items():
        grown = set()
        for s in sums:
            for k in range(count + 1):
                x = s + k * v
                if x > cap + slack:
                    break
                grown.add(round(x, 9))
                if len(grown) > limit:
                    return cap
        sums = grown
    return min(max(sums), cap)


def _exact(pairs: list[tuple[float, int]], num_blocks: int) -> float:
    best = 0.0
    ranges = [range(num_blocks - n + 1) for _, n in pairs]
    for starts in itertools.product(*ranges):
        diff = [0.0] * (num_blocks + 1)
        for (t, n), s in zip(pairs, starts, strict=True):
            diff[s] += t
            diff[s + n] -= t
        low, acc = math.inf, 0.0
        for x in diff[:num_blocks]:
            acc += x
            low = min(low, acc)
        best = max(best, low)
    return best


def optimum(throughputs: Sequence[float], lengths: Sequence[int], num_blocks: int) -> float:
    """The best bottleneck that servers of these throughputs, each holding a contiguous span of its length (clipped
    to the model), could reach over `num_blocks` blocks. Exact when there are at most EXACT_PLACEMENTS placements to
    try; otherwise an upper bound (`_upper_bound`): a quality measured against it is never overstated."""
    if num_blocks <= 0:
        return 0.0
    pairs = _pairs(throughputs, lengths, num_blocks)
    if sum(n for _, n in pairs) < num_blocks:
        return 0.0  # some block is always left out
    placements = math.prod(num_blocks - n + 1 for _, n in pairs)
    if placements <= EXACT_PLACEMENTS:
        return _exact(pairs, num_blocks)
    return _upper_bound(pairs, num_blocks)


def _sweep(servers: list[ServerLoad], num_blocks: int, target: float, longest: bool) -> list[ServerLoad] | None:
    """Servers placed left to right so that every block gets at least `target`, or None when they run out: at each
    block still short of it, the next server starts there (or ends at the model's end). Which one: with `longest`, the
    one bringing the most throughput over the blocks ahead (t * span); else the least throughput that closes the gap
    alone (the most when none does). Servers left over are placed by `choose_span`."""
    speed = np.array([_speed(s.throughput) for s in servers])
    length = np.array([min(s.length, num_blocks) for s in servers])
    free = speed > 0  # not placed yet, and of some use to the sweep
    taken = np.zeros(len(servers), dtype=bool)
    profile = np.zeros(num_blocks)
    placed: list[ServerLoad] = []
    for b in range(num_blocks):
        while profile[b] < target * (1 - _TIE):
            if not free.any():
                return None
            deficit = target - profile[b]
            if longest:
                score = np.where(free, speed * np.minimum(length, num_blocks - b), -1.0)
            else:
                closes = free & (speed >= deficit)
                score = np.where(closes, -speed, -np.inf) if closes.any() else np.where(free, speed, -np.inf)
            i = int(np.argmax(score))
            free[i], taken[i] = False, True
            start = min(b, num_blocks - int(length[i]))
            profile[start:start + length[i]] += speed[i]
            placed.append(ServerLoad(servers[i].peer_id, start, start + int(length[i]), servers[i].throughput))
    for i in np.flatnonzero(~taken):  # choose_span, incrementally
        start = _pick(servers[i].peer_id, _best_starts(profile, int(length[i]), float(speed[i])))
        profile[start:start + length[i]] += speed[i]
        placed.append(ServerLoad(servers[i].peer_id, start, start + int(length[i]), servers[i].throughput))
    return placed


def best_arrangement(servers: Sequence[ServerLoad], num_blocks: int, rounds: int = 3) -> list[ServerLoad]:
    """A good placement of the same servers (lengths and throughputs kept), found centrally, without the rules that
    bind moves: the best of (1) joins one by one, fastest first, each taking `choose_span`, and (2) left-to-right
    sweeps that give every block a target throughput, the target found by bisection; each then improved by `rounds`
    rounds of best responses. Its bottleneck is a lower bound of the optimum."""
    servers = [s for s in servers if s.length > 0]
    if num_blocks <= 0 or not servers:
        return list(servers)
    candidates = []
    placed: list[ServerLoad] = []
    profile = np.zeros(num_blocks)
    for s in sorted(servers, key=lambda s: (-_speed(s.throughput), s.peer_id)):  # choose_span, incrementally
        length = min(s.length, num_blocks)
        start = _pick(s.peer_id, _best_starts(profile, length, _speed(s.throughput)))
        profile[start:start + length] += _speed(s.throughput)
        placed.append(ServerLoad(s.peer_id, start, start + length, s.throughput))
    candidates.append(placed)
    bound = optimum([s.throughput for s in servers], [s.length for s in servers], num_blocks)
    for longest in (True, False):
        low, high = 0.0, bound
        found = _sweep(servers, num_blocks, high, longest)
        for _ in range(16 if found is None else 0):
            target = (low + high) / 2
            arrangement = _sweep(servers, num_blocks, target, longest)
            if arrangement is None:
                high = target
            else:
                low, found = target, arrangement
            if high - low <= 1e-3 * high:
                break
        if found is not None:
            candidates.append(found)
    improved = [_respond(c, num_blocks, rounds, keep_coverage=False) for c in candidates]
    return max(improved, key=lambda c: bottleneck(c, num_blocks))


def balance_quality(servers: Sequence[ServerLoad], num_blocks: int) -> float:
    """The bottleneck now over the best one the balancer could reach with the same servers (the exact optimum for
    small cases, else the better of now and `best_arrangement`): 1.0 when no placement found does better."""
    servers = [s for s in servers if s.length > 0]
    now = bottleneck(servers, num_blocks)
    pairs = _pairs([s.throughput for s in servers], [s.length for s in servers], max(num_blocks, 0))
    if num_blocks > 0 and pairs and math.prod(num_blocks - n + 1 for _, n in pairs) <= EXACT_PLACEMENTS:
        reach = optimum([s.throughput for s in servers], [s.length for s in servers], num_blocks)
    else:
        reach = bottleneck(best_arrangement(servers, num_blocks), num_blocks) if servers else 0.0
    if reach <= now or reach <= 0:
        return 1.0
    return now / reach


# ---------------------------------------------------------------------------------------------------- moving


def _below(a: float, b: float) -> bool:
    """a < b by more than rounding."""
    return a < b - _TIE * max(abs(a), abs(b), 1e-300)


def _respond(servers: list[ServerLoad], num_blocks: int, rounds: int, keep_coverage: bool = True,
             frozen: str = "", goal: float = math.inf) -> list[ServerLoad]:
    """Rounds of best responses: each server in turn (peer id order, `frozen` excepted) takes its best span given
    the rest when that does not lower the bottleneck, and, with `keep_coverage`, when it is not the last holder of a
    block (the rules `plan_move` follows). Stops early when a round moves no one, or once the bottleneck reaches
    `goal`."""
    current = {s.peer_id: s for s in servers if s.length > 0}
    order = sorted(current)
    profile = _profile(current.values(), num_blocks)
    counts = _counts(current.values(), num_blocks)
    for _ in range(rounds):
        moved = False
        for peer in order:
            s = current[peer]
            if peer == frozen:
                continue
            a, b, t = max(s.start, 0), min(s.end, num_blocks), _speed(s.throughput)
            covering = None
            if keep_coverage and (counts[a:b] <= 1).any():
                if profile.min() > 0:
                    continue  # the last holder of a block moves only to close a gap (see plan_move)
                sole = a + np.flatnonzero(counts[a:b] <= 1)
                covering = (int(sole.min()), int(sole.max()) + 1)
            low = profile.min()
            profile[a:b] -= t
            length = min(s.length, num_blocks)
            starts = _best_starts(profile, length, t, covering)
            if not starts:
                profile[a:b] += t
                continue
            start = s.start if s.start in starts and s.end - s.start == length else _pick(peer, starts)
            if start != s.start:
                profile[start:start + length] += t
                if not _below(profile.min(), low):
                    if s.online:
                        counts[a:b] -= 1  # and it holds its new span only once loaded
                    current[peer] = ServerLoad(peer, start, start + length, s.throughput, not keep_coverage)
                    moved = True
                    if profile.min() >= goal:
                        return [current[p] for p in order]
                    continue
                profile[start:start + length] -= t
            profile[a:b] += t
        if not moved:
            break
    return [current[p] for p in order]


def _capacity(servers: Sequence[ServerLoad], num_blocks: int) -> float:
    """Total capacity sum_i t_i n_i / B: no arrangement of these servers has a higher bottleneck."""
    return sum(_speed(s.throughput) * min(s.length, num_blocks) for s in servers) / num_blocks


def plan_move(servers: Sequence[ServerLoad], num_blocks: int, me: str, config: BalanceConfig) -> Move | None:
    """Whether server `me` should move, and where: to its best span given the others, when the swarm's bottleneck
    after the move and the others' simulated best responses exceeds the bottleneck now by the configured quality
    (now < balance_quality * after). None when staying is as good, when `me` is not placed (or not in `servers`), or
    when the move by itself would lower the bottleneck.

    The last server of some block never moves while every block has a server: its move would leave that block
    uncovered. When some block has none already (the model cannot run: nothing to lose), it may move to a span that
    still holds all the blocks it alone holds, and when no single best span closes the gap, every such span is tried
    with the others' responses simulated (a gap that takes two servers' moves, one making room for the other, is
    closed instead of staying forever)."""
    servers = _floored(s for s in servers if s.length > 0)[0]
    mine = next((s for s in servers if s.peer_id == me), None)
    if mine is None or num_blocks <= 0:
        return None
    others = [s for s in servers if s.peer_id != me]
    before = bottleneck(servers, num_blocks)
    if before >= config.balance_quality * _capacity(servers, num_blocks):
        return None  # no arrangement at all would beat now by the quality asked
    length = min(mine.length, num_blocks)
    sole = max(mine.start, 0) + np.flatnonzero(_counts(others, num_blocks)[max(mine.start, 0):mine.end] == 0)
    covering = None
    if sole.size:
        if before > 0:
            return None  # the last holder of a block: its move would leave the block uncovered
        covering = (int(sole.min()), int(sole.max()) + 1)
    profile = _profile(others, num_blocks)
    starts = _best_starts(profile, length, _speed(mine.throughput), covering)
    first = mine.start if mine.start in starts else (_pick(me, starts) if starts else mine.start)
    best = None
    if first != mine.start:
        best = (_after(others, mine, first, length, num_blocks, before, config), first)
    if before <= 0 and (best is None or best[0] is None or not before < config.balance_quality * best[0]):
        for start in _allowed_starts(num_blocks, length, covering):  # a gap: try every span, responses simulated
            if start in (mine.start, first):
                continue
            after = _after(others, mine, start, length, num_blocks, before, config)
            if after is not None and (best is None or best[0] is None or _below(best[0], after)):
                best = (after, start)
    if best is None or best[0] is None or not before < config.balance_quality * best[0]:
        return None
    after, start = best
    end = start + length
    gain = (after - before) / after
    if before <= 0:
        reason = f"blocks {_gaps(servers, num_blocks)} have no server; {start}:{end} covers some"
    else:
        reason = (f"bottleneck {before:.3g} -> {after:.3g} tok/s (+{after / before - 1:.0%}) moving "
                  f"{mine.start}:{mine.end} -> {start}:{end}")
    return Move(start, end, gain, reason, before, after)


def _allowed_starts(num_blocks: int, length: int, covering: tuple[int, int] | None) -> list[int]:
    starts = range(num_blocks - length + 1)
    if covering is None:
        return list(starts)
    return [s for s in starts if s <= covering[0] and s + length >= covering[1]]


def _after(others: list[ServerLoad], mine: ServerLoad, start: int, length: int, num_blocks: int, before: float,
           config: BalanceConfig) -> float | None:
    """The bottleneck once `mine` moved to `start` (and, when that alone is not enough, once the others responded);
    None when the move by itself lowers the bottleneck."""
    moved = ServerLoad(mine.peer_id, start, start + length, mine.throughput)
    alone = bottleneck([*others, moved], num_blocks)
    if _below(alone, before):
        return None
    if before < config.balance_quality * alone:
        return alone
    goal = before / config.balance_quality * (1 + _TIE) if config.balance_quality > 0 else math.inf
    responded = _respond([*others, moved], num_blocks, RESPONSE_ROUNDS, frozen=mine.peer_id, goal=goal)
    return max(alone, bottleneck(responded, num_blocks))


def _gaps(servers: Sequence[ServerLoad], num_blocks: int) -> str:
    counts = _counts(servers, num_blocks)
    gaps: list[list[int]] = []
    for b in np.flatnonzero(counts == 0):
        if gaps and gaps[-1][1] == b:
            gaps[-1][1] = int(b) + 1
        else:
            gaps.append([int(b), int(b) + 1])
    return ", ".join(f"{a}:{b}" for a, b in gaps)


class Rebalancer:
    """The stateful part of rebalancing a server runs every (jittered) period: `check` returns a move only when the
    same target came out of `config.confirmations` checks in a row and at least `config.min_interval` seconds passed
    since the last move (or since this Rebalancer was made, i.e. the server started); call `moved()` once moving."""

    def __init__(self, config: BalanceConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._clock = clock
        self._since = clock()  # the start, then the last move
        self._target: tuple[int, int] | None = None
        self._seen = 0  # checks in a row that gave `_target`
        self.moves = 0  # moves made (counted by `moved`)
        self.last: Move | None = None  # the last move returned by `check`

    def check(self, servers: Sequence[ServerLoad], num_blocks: int, me: str) -> Move | None:
        move = plan_move(servers, num_blocks, me, self.config)
        if move is None:
            self._target, self._seen = None, 0
            return None
        if (move.start, move.end) == self._target:
            self._seen += 1
        else:
            self._target, self._seen = (move.start, move.end), 1
        if self._seen < self.config.confirmations or self._clock() - self._since < self.config.min_interval:
            return None
        self.last = move
        return move

    def moved(self) -> None:
        """Record that the server is moving now: the interval starts again and confirmations are counted anew."""
        self._since = self._clock()
        self._target, self._seen = None, 0
        self.moves += 1
