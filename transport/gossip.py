"""Gossip membership: who is in the swarm, spread peer to peer without any central registry.

What this module does:

* `GossipConfig` -- the timing and size knobs of gossip (round period, fanout, suspicion, expiry, backoff), all of
  which tests may shrink to milliseconds.
* `Membership` -- a pure, thread-safe table of server records (no sockets, no threads, an injectable clock). It
  merges records received from peers (each validated by `record_from_wire`; a bad one is dropped and logged, never
  raised), keeps the highest `seq` per peer, marks a record *suspected* when its seq has not advanced for a while,
  expires it after its `ttl` (measured on our own clock from the moment a newer seq arrived), keeps an offline record
  a little longer so the news spreads, and remembers what it dropped for a while so that a stale copy still
  travelling through the swarm cannot bring a dead record back to life. `heard` tells a reader (`swarm status`) what
  the table saw of one record: its age on our clock, and whether we ever saw its seq advance (if not, that age only
  counts from when we first heard of it, not from when its owner published it).
* `GossipNode` -- runs push-pull rounds in a daemon thread over ZeroMQ (`RpcClient`): every round it refreshes our
  own record (the owner bumps its seq: that is the heartbeat), expires old records, and exchanges the whole table with
  a few random peers or seeds. Failing addresses back off exponentially. `handle` is what a server answers to an
  incoming "gossip" request; `stop(announce_offline=...)` tells the known peers that we are leaving.

A client that only listens uses a `GossipNode` without `refresh_own`: it pulls the same tables, and its pushes carry
no record of its own.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from .codec import MAX_HEADER_BYTES
from .errors import AccessDenied, ConfigError, ProtocolError, SwarmError
from .records import ServerRecord, record_from_wire, record_to_wire
from .rpc import RpcClient, RpcClientConfig, normalize_endpoint

log = logging.getLogger(__name__)

GOSSIP = "gossip"  # message type of a gossip exchange
WIRE_BUDGET = MAX_HEADER_BYTES // 2  # bytes of records in one gossip message, well under the header limit
ANNOUNCE_BUDGET = 2.0  # seconds `stop` spends at most telling peers that we go offline
_DIGITS = re.compile(r"\d+")


@dataclass(frozen=True)
class GossipConfig:
    period: float = 1.0  # seconds between rounds
    fanout: int = 3  # peers contacted per round
    suspect_after: float = 5.0  # a record whose seq has not advanced for this long is suspected (still listed, marked)
    expire_after: float | None = None  # seconds without a newer seq before a record is dropped; None: its own ttl
    offline_linger: float = 30.0  # an offline record is kept this long so the news spreads, then dropped
    max_records: int = 4096  # records of other peers a table holds (and a gossip message may carry)
    request_timeout: float = 1.0  # seconds to wait for a peer's answer to one exchange
    max_backoff: float = 30.0  # cap of the exponential backoff for failing seed/peer addresses

    def __post_init__(self) -> None:
        if not self.period > 0 or self.fanout < 1 or self.max_records < 1 or not self.request_timeout > 0:
            raise ConfigError("gossip period and request_timeout must be > 0, fanout and max_records >= 1")
        if self.expire_after is not None and not self.expire_after > 0:
            raise ConfigError("gossip expire_after must be > 0 (or None to use each record's ttl)")


class _OnceLogger:
    """Logs a repeated problem at `level` (warning) the first time per key, then at debug."""

    def __init__(self, limit: int = 1024, level: int = logging.WARNING):
        self._seen: set[str] = set()
        self._limit = limit
        self._level = level

    def __call__(self, key: str, message: str, *args: Any) -> None:
        if key in self._seen or len(self._seen) >= self._limit:
            log.debug(message, *args)
            return
        self._seen.add(key)
        log.log(self._level, message, *args)

    def forget(self, key: str) -> None:
        self._seen.discard(key)


@dataclass
class _Entry:
    record: ServerRecord
    wire: dict[str, Any]  # record_to_wire(record), computed once
    heard: float  # local clock when this seq arrived
    size: int  # encoded bytes, to keep gossip messages under the header limit
    first: float = 0.0  # local clock when the first record of this peer arrived (kept while it stays in the table)
    advanced: int = 0  # newer seqs that arrived after the first


@dataclass(frozen=True)
class Heard:
    """What a membership table has seen of one peer's record, on our own clock."""

    age: float  # seconds since its newest seq arrived
    known: float  # seconds since its first record arrived (how long we could have seen it advance)
    advanced: int  # newer seqs seen after the first: 0 means `age` counts from our first hearing, not its publishing
    suspected: bool  # age > suspect_after


def _entry(record: ServerRecord, heard: float) -> _Entry:
    wire = record_to_wire(record)
    return _Entry(record, wire, heard, len(msgpack.packb(wire, use_bin_type=True)))


class Membership:
    """What this process knows of the swarm: our own record plus the latest record of every other peer."""

    def __init__(self, config: GossipConfig | None = None, clock: Callable[[], float] = time.monotonic):
        self.config = config or GossipConfig()
        self._clock = clock
        self._lock = threading.Lock()
        self._own: _Entry | None = None
        self._entries: dict[str, _Entry] = {}
        self._tombstones: dict[str, tuple[int, float]] = {}  # peer_id -> (last seq dropped, until when)
        self._dropped = _OnceLogger()

    # -- writing -------------------------------------------------------------------------------------------------

    def set_own(self, record: ServerRecord) -> None:
        """Set our own record (always kept, never expired). Raises ProtocolError when peers would refuse it."""
        own = _entry(record_from_wire(record_to_wire(record)), 0.0)
        with self._lock:
            self._own = own
            self._entries.pop(record.peer_id, None)
            self._tombstones.pop(record.peer_id, None)

    def merge(self, records: Iterable[Any]) -> int:
        """Merge records from a peer (wire dicts or ServerRecords); returns how many were new or newer.

        Invalid or oversized records are dropped and logged, never raised. Records about our own peer id are ignored
        (only we publish those). New peers beyond `max_records` are dropped.
        """
        accepted = 0
        for item in records:
            if self._known(item):
                continue
            try:
                entry = _entry(record_from_wire(record_to_wire(item) if isinstance(item, ServerRecord) else item), 0.0)
            except ProtocolError as e:
                self._dropped(_DIGITS.sub("N", str(e)), "dropping a record from a peer: %s", e)
                continue
            except Exception as e:  # anything else a hostile map can provoke (e.g. unpackable types)
                self._dropped(type(e).__name__, "dropping an unreadable record from a peer: %r", e)
                continue
            with self._lock:
                accepted += self._merge_one(entry)
        return accepted

    def _known(self, item: Any) -> bool:
        """Whether `item` is, at a glance, no newer than what we hold: then it is skipped without validation."""
        if isinstance(item, ServerRecord):
            peer_id, seq = item.peer_id, item.seq
        elif isinstance(item, dict):
            peer_id, seq = item.get("peer_id"), item.get("seq")
            if not isinstance(peer_id, str) or not isinstance(seq, int):
                return False
        else:
            return False
        with self._lock:
            if self._own is not None and peer_id == self._own.record.peer_id:
                return True
            entry = self._entries.get(peer_id)
            if entry is not None:
                return seq <= entry.record.seq
            tomb = self._tombstones.get(peer_id)
            return tomb is not None and seq <= tomb[0] and self._clock() < tomb[1]

    def _merge_one(self, entry: _Entry) -> int:
        record = entry.record
        if self._own is not None and record.peer_id == self._own.record.peer_id:
            return 0
        now = self._clock()
        old = self._entries.get(record.peer_id)
        if old is not None:
            if record.seq <= old.record.seq:
                return 0
        else:
            tomb = self._tombstones.get(record.peer_id)
            if tomb is not None and now < tomb[1] and record.seq <= tomb[0]:
                return 0  # a stale copy of a record we already expired
            if len(self._entries) >= self.config.max_records and not self._make_room(record):
                self._dropped("max_records", "membership table is full (%d records): ignoring new peers",
                              self.config.max_records)
                return 0
        self._tombstones.pop(record.peer_id, None)
        entry.heard = now
        entry.first, entry.advanced = (now, 0) if old is None else (old.first, old.advanced + 1)
        self._entries[record.peer_id] = entry
        return 1

    def _make_room(self, record: ServerRecord) -> bool:
        """For a signed record when the table is full: drop the unsigned record heard of least recently (junk that
        anyone can make must not keep out servers that prove who they are)."""
        if not record.signed:
            return False
        unsigned = [e for e in self._entries.values() if not e.record.signed]
        if not unsigned:
            return False
        oldest = min(unsigned, key=lambda e: e.heard)
        del self._entries[oldest.record.peer_id]
        return True

    def expire(self) -> list[str]:
        """Drop records not refreshed within their ttl (or expire_after) and offline ones after offline_linger."""
        with self._lock:
            now = self._clock()
            dropped = [pid for pid, entry in self._entries.items() if self._expired(entry, now)]
            for pid in dropped:
                entry = self._entries.pop(pid)
                # remember the seq for a while: copies still travelling must not resurrect the record
                self._tombstones[pid] = (entry.record.seq, now + 2 * self._lifetime(entry.record))
            for pid in [pid for pid, (_, until) in self._tombstones.items() if until <= now]:
                del self._tombstones[pid]
            while len(self._tombstones) > self.config.max_records:
                del self._tombstones[next(iter(self._tombstones))]
        for pid in dropped:
            log.debug("peer %s expired from the membership table", pid)
        return dropped

    # -- reading -------------------------------------------------------------------------------------------------

    def _lifetime(self, record: ServerRecord) -> float:
        if record.state == "offline":
            return self.config.offline_linger
        return record.ttl if self.config.expire_after is None else self.config.expire_after

    def _expired(self, entry: _Entry, now: float) -> bool:
        return now - entry.heard > self._lifetime(entry.record)

    def _alive(self, now: float) -> list[_Entry]:
        return [entry for entry in self._entries.values() if not self._expired(entry, now)]

    def records(self, model: str | None = None, include_offline: bool = False) -> list[ServerRecord]:
        """Records not expired (own included), sorted by peer id; offline ones only when asked."""
        with self._lock:
            found = [entry.record for entry in self._alive(self._clock())]
            if self._own is not None:
                found.append(self._own.record)
        return sorted((r for r in found if (model is None or r.model == model)
                       and (include_offline or r.state != "offline")), key=lambda r: r.peer_id)

    def get(self, peer_id: str) -> ServerRecord | None:
        """The current record of `peer_id` (ours included), or None when unknown or expired."""
        with self._lock:
            if self._own is not None and self._own.record.peer_id == peer_id:
                return self._own.record
            entry = self._entries.get(peer_id)
            if entry is None or self._expired(entry, self._clock()):
                return None
            return entry.record

    def suspected(self, peer_id: str) -> bool:
        """Whether the record of `peer_id` has not advanced for suspect_after seconds (never true for our own)."""
        with self._lock:
            entry = self._entries.get(peer_id)
            return entry is not None and self._clock() - entry.heard > self.config.suspect_after

    def last_heard(self, peer_id: str) -> float | None:
        """Seconds since a newer seq of `peer_id` arrived; None for unknown peers and for our own record."""
        with self._lock:
            entry = self._entries.get(peer_id)
            return None if entry is None else max(0.0, self._clock() - entry.heard)

    def heard(self, peer_id: str) -> Heard | None:
        """What we saw of the record of `peer_id` (None for unknown or expired peers and for our own record)."""
        with self._lock:
            entry = self._entries.get(peer_id)
            now = self._clock()
            if entry is None or self._expired(entry, now):
                return None
            age = max(0.0, now - entry.heard)
            return Heard(age, max(0.0, now - entry.first), entry.advanced, age > self.config.suspect_after)

    def to_wire(self, limit: int | None = None, max_bytes: int | None = None) -> list[dict[str, Any]]:
        """Own + known records as wire dicts, offline ones included so that the offline state spreads.

        Own record first, then the most recently heard; `limit` caps the count and `max_bytes` the encoded size.
        """
        with self._lock:
            entries = sorted(self._alive(self._clock()), key=lambda e: e.heard, reverse=True)
            own = self._own
        chosen: list[_Entry] = [] if own is None else [own]
        used = 0
        for entry in entries:
            if limit is not None and len(chosen) >= limit:
                break
            if max_bytes is not None and used + entry.size > max_bytes:
                break
            chosen.append(entry)
            used += entry.size
        if limit is not None:
            chosen = chosen[:limit]
        return [dict(e.wire) for e in chosen]

    def peer_addresses(self) -> list[str]:
        """The first address of every known alive (not expired, not offline) peer other than ourselves."""
        with self._lock:
            return [e.record.addresses[0] for e in self._alive(self._clock()) if e.record.state != "offline"]

    @property
    def own(self) -> ServerRecord | None:
        with self._lock:
            return None if self._own is None else self._own.record

    def __len__(self) -> int:
        """Records held, our own included (expired ones count until `expire` drops them)."""
        with self._lock:
            return len(self._entries) + (self._own is not None)


@dataclass
class _Backoff:
    failures: int = 0
    retry_at: float = 0.0


class GossipNode:
    """Push-pull gossip rounds over ZeroMQ in a daemon thread, plus the server side of an exchange (`handle`)."""

    def __init__(self, membership: Membership, config: GossipConfig | None = None, seeds: Sequence[str] = (),
                 refresh_own: Callable[[], ServerRecord | None] | None = None, context: zmq.Context | None = None,
                 rpc: RpcClientConfig | None = None):
        self.membership = membership
        self._rpc = rpc or RpcClientConfig()  # how exchanges connect (a private swarm's keys)
        self.config = config or membership.config
        try:
            self.seeds = list(dict.fromkeys(normalize_endpoint(s) for s in seeds))
        except SwarmError as e:
            raise ConfigError(f"bad gossip seed: {e}") from None
        self._refresh_own = refresh_own
        self._context = context
        self._clients: dict[str, RpcClient] = {}
        self._backoff: dict[str, _Backoff] = {}
        self._answered: set[str] = set()  # seeds that answered at least once
        self.denied: dict[str, str] = {}  # address -> why it refused us (a private swarm's server; bounded below)
        self._state_lock = threading.Lock()  # clients, backoff and answered, shared with the exchange threads
        # a server warns about peers it cannot reach; a listening client leaves that to its own error messages
        self._failing = _OnceLogger(level=logging.WARNING if refresh_own is not None else logging.INFO)
        self._round_lock = threading.Lock()  # rounds, the offline announcement and closing never overlap
        self._stop = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=max(self.config.fanout, 8), thread_name_prefix="swarm-gossip")

    # -- server side ---------------------------------------------------------------------------------------------

    def handle(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Answer an incoming "gossip" request: merge the records it pushes, return ours (raises ProtocolError)."""
        records = fields.get("records", [])
        if not isinstance(records, list) or len(records) > self.config.max_records:
            raise ProtocolError(f"gossip records must be a list of at most {self.config.max_records} records")
        self.membership.merge(records)
        return {"records": self._table()}

    def add_seeds(self, addresses: Sequence[str]) -> None:
        """More addresses to gossip with (e.g. servers found by mDNS); malformed ones are ignored."""
        fresh = []
        for address in addresses:
            try:
                fresh.append(normalize_endpoint(address))
            except SwarmError:
                log.debug("ignoring a malformed seed address %r", address)
        with self._state_lock:
            self.seeds = list(dict.fromkeys([*self.seeds, *fresh]))

    # -- client side ---------------------------------------------------------------------------------------------

    def start(self) -> GossipNode:
        if self._thread is None and not self._stopped:
            self._thread = threading.Thread(target=self._loop, name="swarm-gossip", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.round()
            except Exception:  # the loop must outlive one bad round
                log.exception("gossip round failed")
            self._stop.wait(self.config.period)

    def round(self) -> int:
        """One round, synchronously: refresh our record, expire, exchange with up to `fanout` targets.

        Returns how many new or newer records the round brought in.
        """
        with self._round_lock:
            if self._stopped:
                return 0
            if self._refresh_own is not None:
                own = self._refresh_own()
                if own is not None:
                    try:
                        self.membership.set_own(own)
                    except ProtocolError as e:  # peers would drop it: say so once, gossip what we know anyway
                        self._failing("own record", "our own record would be refused by peers: %s", e)
            self.membership.expire()
            targets = self._targets()
            if not targets:
                return 0
            deadline = time.monotonic() + self.config.request_timeout
            try:
                futures = [self._pool.submit(self._exchange, addr, deadline) for addr in targets]
            except RuntimeError:  # the pool is gone: the interpreter is exiting
                return 0
            done, _ = wait_futures(futures, timeout=self.config.request_timeout + 1.0)
            return sum(f.result() for f in done)

    def _table(self) -> list[dict[str, Any]]:
        return self.membership.to_wire(limit=self.config.max_records, max_bytes=WIRE_BUDGET)

    def _own_addresses(self) -> set[str]:
        own = self.membership.own
        return set() if own is None else {_normalized(a) for a in own.addresses}

    def _targets(self) -> list[str]:
        own = self._own_addresses()
        peers = {a for a in map(_normalized, self.membership.peer_addresses()) if a and a not in own}
        # seeds stay candidates until they answered once, and again whenever we know no live peer at all
        seeds = {s for s in self.seeds if s not in own and (s not in self._answered or not peers)}
        now = time.monotonic()
        with self._state_lock:
            candidates = sorted(a for a in peers | seeds if a not in self._backoff or self._backoff[a].retry_at <= now)
        self._prune_clients(peers | set(self.seeds))
        return random.sample(candidates, min(self.config.fanout, len(candidates)))

    def _client(self, address: str) -> RpcClient:
        with self._state_lock:
            client = self._clients.get(address)
            if client is None:
                client = self._clients[address] = RpcClient(address, self._rpc, context=self._context)
            return client

    def _prune_clients(self, keep: set[str]) -> None:
        with self._state_lock:
            gone = [self._clients.pop(a) for a in list(self._clients) if a not in keep]
            for address in [a for a in self._backoff if a not in keep]:
                del self._backoff[address]
        for client in gone:
            client.close()

    def _exchange(self, address: str, deadline: float) -> int:
        """Push our table to `address` and merge what it answers; failures back off. Returns records gained."""
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            return 0
        try:
            reply = self._client(address).call(GOSSIP, {"records": self._table()}, timeout=timeout)
            records = reply.fields.get("records", [])
            if not isinstance(records, list) or len(records) > self.config.max_records:
                raise ProtocolError(f"{address} answered gossip with a malformed record list")
        except SwarmError as e:
            self._failed(address, e)
            return 0
        except Exception as e:  # anything else a bad peer or address provokes: the same backoff, no traceback
            self._failed(address, e)
            return 0
        with self._state_lock:
            recovered = self._backoff.pop(address, None) is not None
            self._answered.add(address)
            self.denied.pop(address, None)
        if recovered:
            log.debug("gossip peer %s answers again", address)
            self._failing.forget(address)
        return self.membership.merge(records)

    def _failed(self, address: str, error: Exception) -> None:
        with self._state_lock:
            if isinstance(error, AccessDenied) and (address in self.denied or len(self.denied) < 64):
                self.denied[address] = error.remote_message
            state = self._backoff.setdefault(address, _Backoff())
            state.failures += 1
            delay = min(self.config.max_backoff, self.config.period * 2 ** min(state.failures - 1, 30))
            state.retry_at = time.monotonic() + delay
        self._failing(address, "gossip with %s failed (%s); retrying with backoff", address,
                      error if isinstance(error, SwarmError) else repr(error))

    # -- stopping ------------------------------------------------------------------------------------------------

    def stop(self, announce_offline: ServerRecord | None = None) -> None:
        """Stop the rounds; with `announce_offline`, first set it as our record and push it once to known peers."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.config.request_timeout + 2.0)
        with self._round_lock:
            if self._stopped:
                return
            self._stopped = True
            try:
                if announce_offline is not None:
                    self._announce(announce_offline)
            finally:
                self._prune_clients(set())
                self._pool.shutdown(wait=False, cancel_futures=True)

    def _announce(self, record: ServerRecord) -> None:
        self.membership.set_own(record)
        own = self._own_addresses()
        targets = sorted({a for a in map(_normalized, self.membership.peer_addresses()) if a and a not in own})
        if not targets:
            return
        deadline = time.monotonic() + min(self.config.request_timeout, ANNOUNCE_BUDGET)
        futures = [self._pool.submit(self._exchange, addr, deadline) for addr in targets]
        wait_futures(futures, timeout=ANNOUNCE_BUDGET + 0.5)
        log.debug("announced going %s to %d peers", record.state, len(targets))

    def __enter__(self) -> GossipNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _normalized(address: str) -> str:
    """`address` as RpcClient writes it, or "" when it is not a usable tcp://HOST:PORT endpoint."""
    try:
        return normalize_endpoint(address)
    except SwarmError:
        return ""
