"""`swarm status`: a record's real age and the suspected state, per-block throughput, bottleneck, balance quality and
moves, in JSON, in a table at 80 columns and under --watch. Pure helpers by tables of cases, then in-process servers
on 127.0.0.1 with gossip periods shrunk to a tenth of a second."""

from __future__ import annotations

import io
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import pytest
from conftest import make_tiny_model, swarm_env
from rich.console import Console

from swarm.cli.app import run
from swarm.cli.status import Snapshot, as_json, build_snapshot, render, take_snapshot, watch
from swarm.core.coverage import Age, MoveLog, is_suspected, ranges, record_age, strip_cells, weakest_blocks
from swarm.transport.discovery import Discovery, DiscoveryConfig
from swarm.transport.gossip import GossipConfig, Heard, Membership
from swarm.transport.keys import Identity
from swarm.transport.mdns import MdnsSettings
from swarm.transport.records import ServerRecord, sign_record

FAST = GossipConfig(period=0.1, suspect_after=0.5, request_timeout=0.5)
SERVER_DISCOVERY = DiscoveryConfig(mdns=MdnsSettings(enabled=False), gossip=FAST, record_ttl=2.5)


def rec(peer: str, start: int, end: int, seq: int = 1, **changes) -> ServerRecord:
    fields = dict(peer_id=peer, model="m", start=start, end=end, num_blocks=8, hidden_size=8,
                  addresses=("tcp://127.0.0.1:20000",), seq=seq, ttl=10.0)
    fields.update(changes)
    return ServerRecord(**fields)


def signed(start: int, end: int, throughput: float, num_blocks: int = 80, model: str = "meta-llama/Llama-2-70b-hf",
           **changes) -> ServerRecord:
    identity = Identity()
    record = ServerRecord(identity.peer_id, model, start, end, num_blocks, 8192,
                          (f"tcp://192.168.100.200:{40000 + start}",), throughput=throughput, version="0.13.0",
                          cache_tokens_free=4096, cache_tokens_total=8192, **changes)
    return sign_record(record, identity)


def wait_until(check: Callable[[], bool], timeout: float, poll: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(poll)
    return check()


# -- pure parts ------------------------------------------------------------------------------------------------------


def test_membership_heard_tells_age_on_our_clock_and_whether_the_seq_advanced():
    now = [0.0]
    m = Membership(GossipConfig(suspect_after=5.0), clock=lambda: now[0])
    m.set_own(rec("aa" * 8, 0, 2))
    m.merge([rec("bb" * 8, 0, 2, seq=1)])
    now[0] = 2.0
    assert m.heard("bb" * 8) == Heard(age=2.0, known=2.0, advanced=0, suspected=False)
    m.merge([rec("bb" * 8, 0, 2, seq=2)])
    now[0] = 3.0
    assert m.heard("bb" * 8) == Heard(age=1.0, known=3.0, advanced=1, suspected=False)
    m.merge([rec("bb" * 8, 0, 2, seq=2)])  # the same seq again is no news
    now[0] = 8.5
    assert m.heard("bb" * 8) == Heard(age=6.5, known=8.5, advanced=1, suspected=True) and m.suspected("bb" * 8)
    assert m.heard("aa" * 8) is None and m.heard("cc" * 8) is None  # our own record, an unknown peer
    now[0] = 13.0  # past its ttl of 10 s without news: expired, as records() says too
    assert m.heard("bb" * 8) is None and [r.peer_id for r in m.records()] == ["aa" * 8]


@pytest.mark.parametrize(("heard", "updated_ago", "expected"), [
    (Heard(0.4, 9.0, 3, False), 50.0, Age(0.4, "heard")),  # seen advancing: our clock, whatever the owner's says
    (Heard(0.4, 0.4, 0, False), 30.0, Age(30.0, "clock")),  # heard once: a dead server's record still travelling
    (Heard(3.0, 3.0, 0, False), -60.0, Age(3.0, "clock")),  # owner's clock ahead of ours: never younger than we saw
    (None, 7.0, Age(7.0, "clock")),
])
def test_record_age(heard, updated_ago, expected):
    now = 1_000_000.0
    age = record_age(rec("bb" * 8, 0, 2, updated_at=now - updated_ago), heard, now)
    assert (round(age.seconds, 6), age.source) == (expected.seconds, expected.source)


def test_suspected_only_when_silent_too_long_and_not_offline():
    assert is_suspected(rec("bb" * 8, 0, 2), Age(5.1, "heard"), 5.0)
    assert not is_suspected(rec("bb" * 8, 0, 2), Age(4.9, "heard"), 5.0)
    assert not is_suspected(rec("bb" * 8, 0, 2, state="offline"), Age(60.0, "clock"), 5.0)


def test_ranges_weakest_blocks_and_strip_cells():
    assert ranges([9, 3, 4, 5, 4]) == [(3, 6), (9, 10)] and ranges([]) == []
    assert weakest_blocks([5.0, 2.0, 2.0, 7.0, 2.0]) == [(1, 3), (4, 5)] and weakest_blocks([]) == []
    assert weakest_blocks([0.0, 0.0, 1.0]) == [(0, 2)]
    assert strip_cells([3.0, 1.0, 2.0], 3) == [(0, 1, 3.0), (1, 2, 1.0), (2, 3, 2.0)]  # one cell per block when it fits
    # 80 blocks in 30 cells: 3 blocks per cell, each showing its weakest block
    cells = strip_cells([float(i % 7) for i in range(80)], 30)
    assert len(cells) == 27 and cells[0] == (0, 3, 0.0) and cells[-1] == (78, 80, 1.0)
    assert [c[0] for c in cells] == list(range(0, 80, 3))


def test_move_log_notes_span_changes_between_snapshots_and_forgets_servers_that_left():
    moves = MoveLog(keep=2)
    assert moves.observe([rec("aa" * 8, 0, 2), rec("bb" * 8, 2, 4)], now=1.0) == []
    (move,) = moves.observe([rec("aa" * 8, 4, 6, seq=2), rec("bb" * 8, 2, 4)], now=2.0)
    assert (move.peer_id, move.before, move.after, move.at) == ("aa" * 8, (0, 2), (4, 6), 2.0)
    moves.observe([rec("bb" * 8, 2, 4)], now=3.0)  # aa left ...
    assert moves.observe([rec("aa" * 8, 0, 2, seq=3), rec("bb" * 8, 2, 4)], now=4.0) == []  # ... and came back anew
    moves.observe([rec("aa" * 8, 0, 2, seq=3), rec("bb" * 8, 6, 8, seq=2)], now=5.0)
    moves.observe([rec("aa" * 8, 0, 2, seq=3), rec("bb" * 8, 0, 8, seq=3)], now=6.0)
    assert [(m.peer_id, m.after) for m in moves.moves] == [("bb" * 8, (0, 8)), ("bb" * 8, (6, 8))]  # newest, kept 2
    # an offline record is a server that left, not one that moved
    assert moves.observe([rec("aa" * 8, 4, 6, seq=4, state="offline")], now=7.0) == []


def test_snapshot_figures_and_the_render_fit_80_columns_for_an_80_block_model():
    now = time.time()
    # two fast servers on the same half, a slow one on the other: moving one fast server would quadruple the bottleneck
    records = [signed(0, 40, 2000.0), signed(0, 40, 2000.0), signed(40, 80, 500.0),
               signed(0, 80, 5000.0, updated_at=now - 60)]  # silent for a minute: suspected, left out
    snap = build_snapshot(records, lambda peer: None, suspect_after=5.0, wall_now=now)
    data = as_json(snap)
    (model,) = data["models"]
    assert model["throughput_per_block"] == pytest.approx([4000.0] * 40 + [500.0] * 40)
    assert model["servers_per_block"] == [2] * 40 + [1] * 40 and model["complete"]
    assert model["bottleneck_tokens_per_s"] == pytest.approx(500.0) and model["bottleneck_blocks"] == [[40, 80]]
    assert model["balance_quality"] == pytest.approx(0.25) and model["suspected_servers"] == 1
    assert model["reachable_bottleneck_tokens_per_s"] == pytest.approx(2000.0)
    silent = next(s for s in data["servers"] if s["throughput"] == 5000.0)
    assert silent["suspected"] and silent["shown_state"] == "suspected" and silent["state"] == "online"
    assert silent["age_s"] == pytest.approx(60.0, abs=0.01) and silent["age_source"] == "clock"

    out = io.StringIO()
    Console(file=out, width=80, force_terminal=True, color_system=None).print(render(snap))
    lines = out.getvalue().splitlines()
    assert max(map(len, lines)) <= 80
    strip = lines[next(i for i, line in enumerate(lines) if "not counted" in line) + 1]
    assert len(strip) == 80 and set(strip) <= set("▁▂▃▄▅▆▇█")  # one character per block
    text = out.getvalue()
    assert "suspected" in text and "bottleneck 500 tokens/s at blocks 40:80" in text and "balance quality" in text
    assert "1 suspected server not counted" in text and "60 s*" in text

    narrow = io.StringIO()  # 40 columns: blocks grouped, still within the width
    Console(file=narrow, width=40, force_terminal=True, color_system=None).print(render(snap))
    assert max(map(len, narrow.getvalue().splitlines())) <= 40 and "1 char = 2 blocks" in narrow.getvalue()


def test_a_block_without_a_server_is_a_bottleneck_of_exactly_zero():
    # throughputs that do not cancel exactly in floating point where both spans end
    records = [signed(0, 3, 16026.3, num_blocks=8), signed(0, 6, 2030.7, num_blocks=8)]
    (model,) = as_json(build_snapshot(records, lambda peer: None, suspect_after=5.0, wall_now=time.time()))["models"]
    assert model["missing"] == [[6, 8]] and model["throughput_per_block"][6:] == [0.0, 0.0]
    assert model["bottleneck_tokens_per_s"] == 0.0 and model["bottleneck_blocks"] == [[6, 8]]
    assert model["balance_quality"] == 0.0 and model["reachable_bottleneck_tokens_per_s"] is None


@dataclass(frozen=True)
class Counted(ServerRecord):
    moves: int = 0  # the counter newer servers announce (a field of ServerRecord itself once they do)


def test_move_counters_and_unsigned_servers_are_shown_but_unsigned_ones_not_counted():
    now = time.time()
    records = [Counted(**{**asdict(rec("aa" * 8, 0, 4, throughput=10.0, updated_at=now)), "moves": 3}),
               rec("bb" * 8, 4, 8, throughput=10.0, updated_at=now), signed(4, 8, 7.0, num_blocks=8, model="m")]
    snap = build_snapshot(records, lambda peer: None, suspect_after=5.0, wall_now=now)
    data = as_json(snap)
    counters = {s["peer_id"]: s["moves"] for s in data["servers"]}
    assert counters.pop("aa" * 8) == 3 and set(counters.values()) <= {0, None}  # None: a record without the field
    (model,) = data["models"]
    # the two unsigned servers serve (coverage counts them) but cannot take part in balancing: a forged record could
    assert model["servers_per_block"] == [1] * 4 + [2] * 4 and model["unsigned_servers"] == 2
    assert model["throughput_per_block"] == [0.0] * 4 + [7.0] * 4 and model["bottleneck_blocks"] == [[0, 4]]
    out = io.StringIO()
    Console(file=out, width=120, force_terminal=True, color_system=None).print(render(snap))
    text = out.getvalue()
    assert "2 unsigned servers (older versions) not counted" in text
    row = next(line for line in text.splitlines() if "aaaaaaaa" in line)
    assert row.split("│")[-3].strip() == "3"  # the moves column, before age


# -- in-process servers on 127.0.0.1 ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model8(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("status") / "m8", layers=8)


def listening(*peers: str) -> Discovery:
    return Discovery(list(peers), DiscoveryConfig(mdns=MdnsSettings(enabled=False), gossip=FAST)).start()


def serve(start_server, model, span, *peers, **kwargs):
    return start_server(model, span, discovery=SERVER_DISCOVERY, initial_peers=list(peers), **kwargs)


def ages_heard(snap: Snapshot, count: int) -> bool:
    return len(snap.servers) == count and all(s.age.source == "heard" for s in snap.servers)


def test_json_of_a_swarm_with_uneven_spans(model8, start_server, capsys):
    a = serve(start_server, model8, (0, 8))
    b = serve(start_server, model8, (0, 3), a.endpoint)
    c = serve(start_server, model8, (2, 6), a.endpoint)
    with listening(a.endpoint) as discovery:
        assert wait_until(lambda: ages_heard(take_snapshot(discovery, None), 3), timeout=10)
        data = as_json(take_snapshot(discovery, None))
    speed = {s["peer_id"]: s["throughput"] for s in data["servers"]}
    ta, tb, tc = speed[a.peer_id], speed[b.peer_id], speed[c.peer_id]
    (model,) = data["models"]
    assert model["model"] == model8.name and model["num_blocks"] == 8 and model["complete"]
    assert model["servers_per_block"] == [2, 2, 3, 2, 2, 2, 1, 1]
    expected = [ta + tb, ta + tb, ta + tb + tc, ta + tc, ta + tc, ta + tc, ta, ta]
    assert model["throughput_per_block"] == pytest.approx(expected, rel=1e-6)
    assert model["bottleneck_tokens_per_s"] == pytest.approx(ta) and model["bottleneck_blocks"] == [[6, 8]]
    assert 0 < model["balance_quality"] <= 1 and model["suspected_servers"] == 0
    for s in data["servers"]:
        assert not s["suspected"] and s["shown_state"] == "online" and s["age_source"] == "heard"
        assert 0 <= s["age_s"] < FAST.suspect_after and s["last_seen_s"] == s["age_s"]
    assert data["moves"] == []

    # the command itself prints the same keys
    assert run(["status", "--initial-peers", a.endpoint, "--no-mdns", "--wait", "0.6", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {s["peer_id"] for s in printed["servers"]} == {a.peer_id, b.peer_id, c.peer_id}
    assert printed["models"][0]["bottleneck_blocks"] == [[6, 8]] and set(printed) == {"servers", "models", "moves",
                                                                                         "at"}


def test_a_server_gone_silent_is_suspected_with_a_growing_age_then_expires(model8, start_server):
    a = serve(start_server, model8, (0, 4))
    b = serve(start_server, model8, (4, 8), a.endpoint)
    with listening(b.endpoint) as discovery:
        assert wait_until(lambda: ages_heard(take_snapshot(discovery, None), 2), timeout=10)
        a.discovery.stop()  # a's gossip dies without a word: no offline record, its last one lives on in b's table
        silent_since = time.monotonic()

        def a_view(snap: Snapshot):
            return next((s for s in snap.servers if s.record.peer_id == a.peer_id), None)

        assert wait_until(lambda: (v := a_view(take_snapshot(discovery, None))) is not None and v.suspected,
                          timeout=SERVER_DISCOVERY.record_ttl)
        first = as_json(take_snapshot(discovery, None))
        time.sleep(0.3)
        later = as_json(take_snapshot(discovery, None))
        assert time.monotonic() - silent_since < SERVER_DISCOVERY.record_ttl, "the machine was too slow to tell"
        for data in (first, later):
            view = {s["peer_id"]: s for s in data["servers"]}
            assert view[a.peer_id]["suspected"] and view[a.peer_id]["shown_state"] == "suspected"
            assert not view[b.peer_id]["suspected"] and view[b.peer_id]["shown_state"] == "online"
            (model,) = data["models"]
            assert model["missing"] == [[0, 4]] and model["suspected_servers"] == 1
        age = {d["at"]: next(s["age_s"] for s in d["servers"] if s["peer_id"] == a.peer_id) for d in (first, later)}
        assert age[later["at"]] >= age[first["at"]] + 0.25 > FAST.suspect_after

        # a status started now hears a's last record once: its age comes from a's clock, and it is suspected at once
        with listening(b.endpoint) as fresh:
            assert wait_until(lambda: len(fresh.records()) == 2, timeout=5)
            view = {s.record.peer_id: s for s in take_snapshot(fresh, None).servers}
            assert view[a.peer_id].age.source == "clock" and view[a.peer_id].suspected
            assert view[a.peer_id].age.seconds > FAST.suspect_after

        # then its ttl runs out everywhere and it is gone
        assert wait_until(lambda: a_view(take_snapshot(discovery, None)) is None,
                          timeout=2 * SERVER_DISCOVERY.record_ttl)


def test_watch_renders_and_notes_a_server_that_moved(model8, start_server, tmp_path):
    identity = str(tmp_path / "a.key")
    a = serve(start_server, model8, (0, 4), identity=identity)
    b = serve(start_server, model8, (4, 8), a.endpoint)
    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=True, color_system=None)
    shown: list[Snapshot] = []

    def show(snap: Snapshot) -> None:
        shown.append(snap)
        console.print(render(snap))

    moves = MoveLog()
    with listening(b.endpoint) as discovery:
        assert wait_until(lambda: len(discovery.records()) == 2, timeout=10)
        watch(discovery, None, show, period=0.2, refreshes=1, moves=moves)
        assert len(shown) == 1 and "recent moves" not in out.getvalue()
        # a moves: the same peer (same key) comes back serving 4:8, its newer record replacing the old one
        a.discovery.stop()
        a.stop()
        moved = serve(start_server, model8, (4, 8), b.endpoint, identity=identity)
        assert moved.peer_id == a.peer_id
        for _ in range(40):  # bounded: 40 refreshes of 0.1 s at most
            watch(discovery, None, show, period=0.1, refreshes=1, moves=moves)
            if shown[-1].moves:
                break
    (move,) = shown[-1].moves
    assert (move.peer_id, move.before, move.after) == (a.peer_id, (0, 4), (4, 8))
    text = out.getvalue()
    assert "recent moves" in text and f"{a.peer_id[:8]} {model8.name} 0:4 → 4:8" in text
    assert max(map(len, text.splitlines())) <= 80
    assert as_json(shown[-1])["moves"][0]["from"] == [0, 4]


def read_lines(stream, count: int, timeout: float, until: str | None = None) -> list[str]:
    """Up to `count` lines of a process's stdout or stderr (or until a line holds `until`), waiting at most `timeout`
    seconds in all."""
    lines: list[str] = []
    buffer = b""
    deadline = time.monotonic() + timeout
    poller = select.poll()  # not select(): a long test session may hold file descriptors past 1024
    poller.register(stream, select.POLLIN)
    while len(lines) < count and (left := deadline - time.monotonic()) > 0:
        if until is not None and any(until in line for line in lines):
            break
        if not poller.poll(left * 1000):
            break
        chunk = os.read(stream.fileno(), 1 << 16)
        if not chunk:
            break
        buffer += chunk
        *done, buffer = buffer.split(b"\n")
        lines += [line.decode() for line in done]
    return lines


@pytest.mark.parametrize("as_json_lines", [True, False])
def test_the_watch_command_refreshes_until_ctrl_c(model8, start_server, tmp_path, as_json_lines):
    server = serve(start_server, model8, (0, 8))
    args = [sys.executable, "-m", "swarm", "status", "--watch", "--initial-peers", server.endpoint, "--no-mdns",
            "--wait", "0.3", *(["--json"] if as_json_lines else [])]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=swarm_env(tmp_path))
    try:
        if as_json_lines:  # one JSON object per line per refresh, on stdout
            lines = read_lines(proc.stdout, 2, timeout=30)
            assert len(lines) == 2, "no refresh within 30 s"
            for line in lines:
                data = json.loads(line)
                assert [s["peer_id"] for s in data["servers"]] == [server.peer_id]
                assert data["models"][0]["bottleneck_blocks"] == [[0, 8]]
        else:  # stderr is not a terminal: whole views one after the other (the first, then a refresh)
            text, deadline = "", time.monotonic() + 30
            while text.count("balance quality") < 2 and time.monotonic() < deadline:
                text += "\n".join(read_lines(proc.stderr, 1000, deadline - time.monotonic(), "balance quality"))
            assert text.count("balance quality 1.00") >= 2 and server.peer_id[:8] in text
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=15)
        assert b"Traceback" not in rest and (as_json_lines or "Traceback" not in text)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 130
