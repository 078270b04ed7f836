"""Gossip membership: the pure table with a fake clock, then three real ZeroMQ servers gossiping on 127.0.0.1."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import msgpack
import pytest

from swarm.transport.codec import PROTOCOL_VERSION
from swarm.transport.errors import BadRequest, PeerUnreachable, ProtocolError
from swarm.transport.gossip import GossipConfig, GossipNode, Membership
from swarm.transport.records import (
    MAX_CAPABILITIES,
    ServerRecord,
    normalize_endpoint,
    record_from_wire,
    record_to_wire,
)
from swarm.transport.rpc import Request, RpcClient, RpcServer, RpcServerConfig


def peer(i: int) -> str:
    return f"{i + 1:016x}"


def rec(i: int, seq: int = 1, **changes) -> ServerRecord:
    fields = dict(peer_id=peer(i), model="tiny", start=0, end=2, num_blocks=4, hidden_size=8,
                  addresses=(f"tcp://127.0.0.1:{20000 + i}",), seq=seq, ttl=10.0)
    fields.update(changes)
    return ServerRecord(**fields)


def fake_clock() -> tuple[list[float], Callable[[], float]]:
    now = [0.0]
    return now, lambda: now[0]


def table(config: GossipConfig | None = None) -> tuple[list[float], Membership]:
    now, clock = fake_clock()
    return now, Membership(config or GossipConfig(), clock=clock)


# -- Membership ---------------------------------------------------------------------------------------------------


def test_newer_seq_wins_and_older_is_ignored():
    _, m = table()
    assert m.merge([record_to_wire(rec(1, seq=5, throughput=1.0))]) == 1
    assert m.merge([record_to_wire(rec(1, seq=4, throughput=2.0)), rec(1, seq=5, throughput=3.0)]) == 0
    assert m.get(peer(1)).throughput == 1.0
    assert m.merge([rec(1, seq=6, throughput=4.0)]) == 1  # a ServerRecord is accepted as well as a wire dict
    assert m.get(peer(1)).throughput == 4.0 and m.get(peer(1)).seq == 6
    assert len(m) == 1


def _bad_records() -> list[object]:
    good = record_to_wire(rec(7))
    bad: list[object] = [42, None, "record", [good], {}]
    for key, value in [("model", "x" * 10_000), ("seq", "1"), ("start", 1.5), ("num_blocks", True),
                       ("peer_id", "XYZ"), ("peer_id", "abc"), ("peer_id", "ABCDEF0123456789"), ("state", "zombie"),
                       ("addresses", ["udp://127.0.0.1:1"]), ("addresses", []), ("addresses", "tcp://h:1"),
                       ("ttl", -1.0), ("ttl", float("nan")), ("end", 99), ("adapters", ["a"] * 1000)]:
        bad.append({**good, key: value})
    missing = dict(good)
    del missing["hidden_size"]
    bad.append(missing)
    return bad


# addresses a record may carry: what ZeroMQ can connect to, written as normalize_endpoint writes it
GOOD_ADDRESSES = ["tcp://127.0.0.1:9", "tcp://0.0.0.0:65535", "tcp://localhost:1", "tcp://my-host.example.org:5555",
                  "tcp://[::1]:9", "tcp://[fe80::1%eth0]:9", "tcp://[::ffff:1.2.3.4]:9", "tcp://9host:9"]
BAD_ADDRESSES = [
    "tcp://*:1", "tcp://a b:9", "tcp://a..b:9", "tcp://.a:9", "tcp://a.:9", "tcp://:9", "tcp://-a:9", "tcp://a-:9",
    "tcp://a_b:9", "tcp://a\x01:9", "tcp://a\tb:9", "tcp://\u00e9t\u00e9:9", "tcp://a\u00a0b:9", " tcp://127.0.0.1:9",
    "tcp://127.0.0.1:9 ", "tcp://127.0.0.1:0", "tcp://127.0.0.1:65536", "tcp://127.0.0.1:\u00b2",
    "tcp://127.0.0.1:09", "tcp://127.0.0.1", "tcp://1.2.3:9", "tcp://999.1.1.1:9", "tcp://01.2.3.4:9",
    "tcp://::1:9", "tcp://[::1:9", "tcp://[zz::1]:9", "tcp://[::1%a b]:9", "tcp://[::1%]:9", "udp://127.0.0.1:9",
    "127.0.0.1:9", "tcp://" + "a" * 64 + ":9", "tcp://" + ".".join(["a" * 60] * 5) + ":9",
]


@pytest.mark.parametrize("address", GOOD_ADDRESSES)
def test_records_keep_addresses_zeromq_can_connect_to(address):
    assert normalize_endpoint(address) == address
    assert record_from_wire(record_to_wire(rec(1, addresses=(address,)))).addresses == (address,)


@pytest.mark.parametrize("address", BAD_ADDRESSES)
def test_records_with_addresses_zeromq_refuses_are_dropped(address):
    with pytest.raises(ProtocolError, match="addresses"):
        record_from_wire(record_to_wire(rec(1, addresses=("tcp://127.0.0.1:9", address))))


@pytest.mark.parametrize("given,expected", [
    ("127.0.0.1:5555", "tcp://127.0.0.1:5555"), (" tcp://host:080 ", "tcp://host:80"), ("[::1]:7", "tcp://[::1]:7"),
    ("tcp://*:1", None), ("tcp://a b:9", None), ("h:\u00b2", None), ("", None), ("tcp://", None), (None, None),
])
def test_normalize_endpoint(given, expected):
    if expected is None:
        with pytest.raises(PeerUnreachable):
            normalize_endpoint(given)
    else:
        assert normalize_endpoint(given) == expected


def test_capabilities_travel_in_records_and_unknown_names_are_kept():
    names = ("relay", "batching", "some-future.feature_2")  # a name this version does not know is kept as it is
    record = rec(1, capabilities=names)
    wire = record_to_wire(record)
    assert wire["capabilities"] == list(names)
    assert record_from_wire(msgpack.unpackb(msgpack.packb(wire))) == record
    widest = tuple(f"{i:02d}" + "x" * 30 for i in range(MAX_CAPABILITIES))  # 32 names of 32 characters
    assert record_from_wire(record_to_wire(rec(1, capabilities=widest))).capabilities == widest


def test_records_without_capabilities_or_protocol_are_valid():
    older = record_to_wire(rec(1))
    del older["capabilities"], older["protocol"]  # what a peer before these fields sends
    record = record_from_wire(older)
    assert record.capabilities == () and record.protocol == PROTOCOL_VERSION == rec(1).protocol


@pytest.mark.parametrize("capabilities", [
    ["x"] * (MAX_CAPABILITIES + 1), ["x" * 33], [""], ["Relay"], ["re lay"], ["relay/2"], ["caf\u00e9"], [5], [None],
    [["relay"]], "relay", {"relay": True}, None,
])
def test_records_with_bad_capabilities_are_refused(capabilities):
    with pytest.raises(ProtocolError, match="capabilities"):
        record_from_wire({**record_to_wire(rec(1)), "capabilities": capabilities})


def test_invalid_and_oversized_records_are_dropped_without_raising(caplog):
    _, m = table()
    m.set_own(rec(0))
    m.merge([rec(1)])
    before = m.to_wire()
    with caplog.at_level(logging.DEBUG, logger="swarm.transport.gossip"):
        assert m.merge(_bad_records()) == 0
        assert m.merge(_bad_records()) == 0
    assert m.to_wire() == before and len(m) == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    debugs = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert warnings and len(warnings) <= len(_bad_records())  # each reason warned once ...
    assert len(debugs) >= len(_bad_records())  # ... and the repeats only at debug
    assert m.merge([*_bad_records(), record_to_wire(rec(2))]) == 1  # a good record among bad ones still counts


def test_record_expires_after_its_ttl_unless_a_newer_seq_arrives():
    now, m = table()
    m.merge([rec(1, ttl=2.0), rec(2, ttl=2.0)])
    now[0] = 1.5
    m.merge([rec(1, seq=2, ttl=2.0), rec(2, seq=1, ttl=2.0)])  # 1 advances, 2 repeats its old seq
    now[0] = 1.9
    assert m.expire() == [] and {r.peer_id for r in m.records()} == {peer(1), peer(2)}
    now[0] = 2.1
    assert [r.peer_id for r in m.records()] == [peer(1)]  # filtered even before expire() runs
    assert m.get(peer(2)) is None and len(m) == 2
    assert m.expire() == [peer(2)] and len(m) == 1
    assert m.merge([rec(2, seq=1, ttl=2.0)]) == 0  # a stale copy still travelling does not resurrect it
    assert m.merge([rec(2, seq=2, ttl=2.0)]) == 1  # a newer seq does
    now[0] = 3.6
    assert m.expire() == [peer(1)]


def test_expire_after_overrides_the_record_ttl():
    now, m = table(GossipConfig(expire_after=1.0))
    m.merge([rec(1, ttl=100.0)])
    now[0] = 1.01
    assert m.expire() == [peer(1)]


def test_suspected_after_suspect_after_but_still_listed():
    now, m = table(GossipConfig(suspect_after=1.0))
    m.merge([rec(1)])
    now[0] = 0.5
    assert not m.suspected(peer(1)) and m.last_heard(peer(1)) == 0.5
    now[0] = 1.5
    assert m.suspected(peer(1)) and m.get(peer(1)) is not None and m.records()[0].peer_id == peer(1)
    m.merge([rec(1, seq=2)])
    assert not m.suspected(peer(1)) and m.last_heard(peer(1)) == 0.0
    assert not m.suspected(peer(9)) and m.last_heard(peer(9)) is None


def test_offline_record_lingers_then_is_dropped():
    now, m = table(GossipConfig(offline_linger=5.0))
    m.merge([rec(1, ttl=1.0), rec(2)])
    assert m.merge([rec(1, seq=2, ttl=1.0, state="offline")]) == 1
    now[0] = 3.0  # past the record's ttl, within offline_linger
    assert m.expire() == []
    assert [r.peer_id for r in m.records()] == [peer(2)]
    assert {r.peer_id for r in m.records(include_offline=True)} == {peer(1), peer(2)}
    assert m.get(peer(1)).state == "offline"
    assert peer(1) in {d["peer_id"] for d in m.to_wire()}  # the news keeps spreading
    assert m.peer_addresses() == [rec(2).addresses[0]]
    now[0] = 5.5
    assert m.expire() == [peer(1)]


def test_own_record_never_expires_and_claims_on_our_peer_id_are_ignored():
    now, m = table(GossipConfig(suspect_after=1.0))
    m.set_own(rec(0, ttl=1.0))
    m.merge([rec(1)])
    assert m.merge([rec(0, seq=99, model="impostor")]) == 0
    now[0] = 100.0
    assert m.expire() == [peer(1)]
    assert [r.peer_id for r in m.records()] == [peer(0)] and m.get(peer(0)).model == "tiny"
    assert not m.suspected(peer(0)) and m.last_heard(peer(0)) is None
    assert m.to_wire()[0]["peer_id"] == peer(0)
    assert m.peer_addresses() == []
    m.set_own(rec(0, seq=2, state="offline"))
    assert m.records() == [] and m.records(include_offline=True)[0].state == "offline"


def test_to_wire_limit_is_newest_first_after_own_and_records_filter_by_model():
    now, m = table()
    m.set_own(rec(0))
    for i in (1, 2, 3):
        now[0] = float(i)
        m.merge([rec(i, model="other" if i == 2 else "tiny")])
    assert [d["peer_id"] for d in m.to_wire(limit=3)] == [peer(0), peer(3), peer(2)]
    assert len(m.to_wire()) == 4 == len(m)
    assert [r.peer_id for r in m.records(model="other")] == [peer(2)]
    assert [r.peer_id for r in m.records(model="tiny")] == [peer(0), peer(1), peer(3)]


def test_max_records_cap_drops_new_peers_but_accepts_newer_seqs():
    _, m = table(GossipConfig(max_records=3))
    m.set_own(rec(0))
    assert m.merge([rec(i) for i in range(1, 6)]) == 3
    assert len(m) == 4 and m.get(peer(4)) is None
    assert m.merge([rec(1, seq=2)]) == 1
    node = GossipNode(m)
    try:
        with pytest.raises(ProtocolError):
            node.handle({"records": [record_to_wire(rec(i)) for i in range(1, 5)]})
        with pytest.raises(ProtocolError):
            node.handle({"records": "not a list"})
        assert len(node.handle({})["records"]) == 3  # own + two others: never more than max_records
    finally:
        node.stop()


# -- real sockets ---------------------------------------------------------------------------------------------------

FAST = GossipConfig(period=0.05, fanout=3, suspect_after=0.3, offline_linger=5.0, request_timeout=0.5,
                    max_backoff=0.2)


@dataclass
class Peer:
    server: RpcServer
    node: GossipNode
    membership: Membership
    own: list[ServerRecord]

    @property
    def peer_id(self) -> str:
        return self.own[0].peer_id

    def stop(self, announce_offline: ServerRecord | None = None) -> None:
        self.node.stop(announce_offline)
        self.server.stop()


def start_peer(i: int, seeds: list[str], ttl: float = 0.5) -> Peer:
    holder: list[GossipNode] = []

    def handler(req: Request) -> None:
        if req.message.type == "gossip":
            req.reply(holder[0].handle(req.message.fields))
        else:
            req.fail("unknown_method", f"no method {req.message.type!r}")

    server = RpcServer(handler, RpcServerConfig(host="127.0.0.1", port=0, poll_ms=10))
    own = [rec(i, addresses=(server.endpoint,), ttl=ttl)]

    def refresh() -> ServerRecord:
        own[0] = own[0].bump()  # the heartbeat: a higher seq every round
        return own[0]

    membership = Membership(FAST)
    node = GossipNode(membership, FAST, seeds=seeds, refresh_own=refresh)
    holder.append(node)
    server.start()
    node.start()
    return Peer(server, node, membership, own)


def wait_until(check: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.01)
    return check()


@contextmanager
def swarm_of_three() -> Iterator[list[Peer]]:
    peers: list[Peer] = []
    try:
        peers.append(start_peer(0, seeds=[]))
        for i in (1, 2):
            peers.append(start_peer(i, seeds=[peers[0].server.endpoint]))
        yield peers
    finally:
        for p in peers:
            p.stop()


def ids(m: Membership) -> set[str]:
    return {r.peer_id for r in m.records()}


def test_three_servers_converge_announce_offline_and_expire_a_silent_peer():
    with swarm_of_three() as peers:
        everyone = {p.peer_id for p in peers}
        assert wait_until(lambda: all(ids(p.membership) == everyone for p in peers), 5.0)

        # a listening client: no own record, pulls through the seed like everyone else
        listener = GossipNode(Membership(FAST), FAST, seeds=[peers[0].server.endpoint])
        try:
            assert wait_until(lambda: listener.round() >= 0 and ids(listener.membership) == everyone, 5.0)
            assert listener.membership.to_wire() and listener.membership.own is None
        finally:
            listener.stop()

        leaving = peers[1]
        leaving.stop(announce_offline=leaving.own[0].bump(state="offline"))
        for p in (peers[0], peers[2]):
            assert wait_until(lambda p=p: getattr(p.membership.get(leaving.peer_id), "state", None) == "offline",
                              1.0)
            assert leaving.peer_id not in ids(p.membership)
        assert leaving.server.endpoint not in peers[0].membership.peer_addresses()

        silent = peers[2]
        silent.stop()  # no announcement: the others stop hearing newer seqs and drop it after its ttl (0.5 s)
        assert wait_until(lambda: peers[0].membership.suspected(silent.peer_id), 2.0)
        assert wait_until(lambda: peers[0].membership.get(silent.peer_id) is None, 3.0)
        assert ids(peers[0].membership) == {peers[0].peer_id}


def test_gossip_request_with_a_bad_record_list_gets_an_error_reply():
    peer0 = start_peer(0, seeds=[])
    try:
        with RpcClient(peer0.server.endpoint) as client:
            with pytest.raises(BadRequest):
                client.call("gossip", {"records": {"not": "a list"}}, timeout=2.0)
            reply = client.call("gossip", {"records": [{"garbage": True}, record_to_wire(rec(5))]}, timeout=2.0)
        assert peer0.peer_id in {d["peer_id"] for d in reply.fields["records"]}
        assert peer0.membership.get(peer(5)) is not None
    finally:
        peer0.stop()


def test_gossip_with_records_of_unusable_addresses_neither_raises_nor_logs_tracebacks(caplog):
    peer0 = start_peer(0, seeds=[])
    node = GossipNode(Membership(FAST), FAST, seeds=[peer0.server.endpoint])
    bad = [record_to_wire(rec(10 + i, addresses=(address,))) for i, address in enumerate(BAD_ADDRESSES)]
    try:
        with caplog.at_level(logging.DEBUG, logger="swarm.transport"):
            with RpcClient(peer0.server.endpoint) as client:  # a peer pushes them to a server ...
                client.call("gossip", {"records": bad}, timeout=2.0)
            node.membership.merge(bad)  # ... and a node learns them some other way
            for _ in range(3):
                node.round()
                peer0.node.round()
        assert ids(node.membership) == ids(peer0.membership) == {peer(0)}
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert warnings and all("dropping" in w and warnings.count(w) <= 2 for w in warnings), warnings  # each
        # reason once per table that dropped such records, and nothing about the addresses themselves
    finally:
        node.stop()
        peer0.stop()


def test_failing_seed_backs_off_and_warns_once(caplog):
    dead = RpcServer(lambda req: None, RpcServerConfig(host="127.0.0.1", port=0))  # bound, never served
    config = GossipConfig(period=0.001, request_timeout=0.05, max_backoff=0.002)
    own = rec(7)
    node = GossipNode(Membership(config), config, seeds=[dead.endpoint], refresh_own=lambda: own)
    try:
        with caplog.at_level(logging.DEBUG, logger="swarm.transport.gossip"):
            for _ in range(3):
                assert node.round() == 0
                time.sleep(0.003)  # let the (2 ms) backoff pass
        assert node._backoff[dead.endpoint].failures == 3
        warned = [r for r in caplog.records if r.levelno == logging.WARNING and dead.endpoint in r.getMessage()]
        assert len(warned) == 1  # a server warns once per failing peer; a listening client logs it at info
        slow = GossipNode(Membership(config), GossipConfig(request_timeout=0.05, max_backoff=30.0),
                          seeds=[dead.endpoint])
        try:
            slow.round()
            start = time.monotonic()
            slow.round()  # backed off: no target, no wait
            assert time.monotonic() - start < 0.04
        finally:
            slow.stop()
    finally:
        node.stop()
        dead.stop()
