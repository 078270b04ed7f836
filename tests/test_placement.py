"""Servers that choose their blocks and move: throughput (measured, cached, given), how many blocks fit in memory,
the chosen spans of servers started together, gaps filled after a death, a joiner taking the weakest blocks, exact
generations through a server that moves, the `moves` record field, and clear errors for bad options."""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import msgpack
import pytest
import torch
from conftest import fork_swarm, load_reference, make_tiny_model, swarm_env

from swarm import AutoDistributedModelForCausalLM
from swarm.core.balance import ServerLoad, choose_span
from swarm.core.client.config import ClientConfig
from swarm.core.server import throughput as tp
from swarm.core.server.placement import (
    RESERVE_BYTES,
    BalanceSettings,
    BlockCost,
    block_cost,
    blocks_for_memory,
    fits_both,
    parse_memory,
    parse_throughput,
)
from swarm.core.weights import ModelSource
from swarm.transport.discovery import DiscoveryConfig
from swarm.transport.errors import ConfigError, ProtocolError
from swarm.transport.gossip import GossipConfig
from swarm.transport.keys import Identity
from swarm.transport.mdns import MdnsSettings
from swarm.transport.records import ServerRecord, record_from_wire, record_to_wire, sign_record

PROMPT = torch.tensor([[7, 3, 9, 1, 4, 4, 2]])


@pytest.fixture(scope="module")
def model8(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("placement") / "llama8", layers=8, seed=13)


@pytest.fixture(scope="module")
def ref8(model8):
    return load_reference(model8)


def fast_discovery(period: float = 0.1, ttl: float = 1.5) -> DiscoveryConfig:
    return DiscoveryConfig(mdns=MdnsSettings(enabled=False), gossip=GossipConfig(period=period,
                                                                                  suspect_after=3 * period),
                           record_ttl=ttl)


# --- throughput -----------------------------------------------------------------------------------------------------

def test_throughput_auto_is_cached_eval_measures_again_a_number_is_used_as_given(model8, tmp_path, monkeypatch):
    source = ModelSource(str(model8))
    config, family = source.config("float32"), source.family()
    path = tmp_path / "cache" / "throughput.json"
    first = tp.resolve("auto", "m8", family, config, torch.float32, 100.0, path)
    assert first.source == "measured" and first.forward_tps > 0 and first.inference_sps > 0
    key = tp.cache_key("m8", torch.float32)
    assert json.loads(path.read_text())[key]["forward_tps"] == first.forward_tps

    measured = []
    real_measure = tp.measure
    monkeypatch.setattr(tp, "measure", lambda *a, **k: measured.append(1) or real_measure(*a, **k))
    second = tp.resolve("auto", "m8", family, config, torch.float32, 100.0, path)  # a second start: the cache
    assert second.source == "cache" and measured == []
    assert (second.forward_tps, second.inference_sps) == (first.forward_tps, first.inference_sps)
    other = tp.resolve("auto", "m8", family, config, torch.bfloat16, 100.0, path)  # another dtype: another key
    assert other.source == "measured" and len(measured) == 1
    again = tp.resolve("eval", "m8", family, config, torch.float32, 100.0, path)
    assert again.source == "measured" and len(measured) == 2
    given = tp.resolve(123.5, "m8", family, config, torch.float32, 100.0, path)
    assert given.source == "given" and given.announced(1) == given.announced(8) == 123.5 and len(measured) == 2

    path.write_text("{not json")  # a broken cache is measured over, never trusted
    assert tp.resolve("auto", "m8", family, config, torch.float32, 100.0, path).source == "measured"
    assert tp.cached(key, path) is not None


def test_announced_throughput_formula():
    value = tp.Throughput(forward_tps=900.0, inference_sps=50.0, network_tps=math.inf)
    assert value.announced(1) == 900.0 and value.announced(2) == 600.0 and value.announced(8) == 200.0
    slow_link = replace(value, network_tps=tp.network_tps(1.0, 64, torch.float32))  # 1 Mbit/s, 256 B a token
    assert slow_link.network_tps == pytest.approx(488.3, abs=0.1)
    assert slow_link.announced(1) == pytest.approx(488.3, abs=0.1) and slow_link.announced(8) == 200.0


def test_server_announces_the_given_throughput(model8, start_server, tmp_path):
    server = start_server(model8, (0, 2), throughput=77.0, throughput_cache=str(tmp_path / "t.json"))
    assert server.record().throughput == 77.0
    assert server.handler.info()["throughput_detail"]["source"] == "given"
    assert not (tmp_path / "t.json").exists()  # nothing measured, nothing cached


# --- how many blocks --------------------------------------------------------------------------------------------------

COST = BlockCost(weights=10_000_000, cache_per_token=1_000)  # 10 MB of weights, 1 kB of cache a token, per block


@pytest.mark.parametrize("memory,cache_tokens,num_blocks,expected", [
    (RESERVE_BYTES + 10_000_000 + 20_000_000, 10_000, 80, 1),  # reserve + one block of slack + one block (10+10 MB)
    (RESERVE_BYTES + 10_000_000 + 100_000_000, 10_000, 80, 5),
    (RESERVE_BYTES + 10_000_000 + 109_999_999, 10_000, 80, 5),  # floor
    (RESERVE_BYTES + 10_000_000 + 100_000_000, 0, 80, 10),  # no cache budget: weights only
    (RESERVE_BYTES + 10_000_000 + 100_000_000, 90_000, 80, 1),  # a big cache budget takes the room
    (1 << 40, 8192, 32, 32),  # never more than the model's blocks
])
def test_blocks_for_memory(memory, cache_tokens, num_blocks, expected):
    assert blocks_for_memory(memory, COST, cache_tokens, num_blocks) == expected


@pytest.mark.parametrize("memory", [0, RESERVE_BYTES, RESERVE_BYTES + 10_000_000 + 19_999_999])
def test_memory_that_holds_no_block_is_a_clear_error(memory):
    with pytest.raises(ConfigError, match="holds no block of this model: one block needs"):
        blocks_for_memory(memory, COST, 10_000, 80)


def test_fits_both():
    room = RESERVE_BYTES + 10_000_000 + 6 * 20_000_000
    assert fits_both(room, COST, 10_000, 3, 3) and not fits_both(room - 1, COST, 10_000, 3, 3)


def test_block_cost_counts_what_a_loaded_block_holds(model8):
    from swarm.core.server.backend import BlockSpan

    source = ModelSource(str(model8))
    for dtype in (torch.float32, torch.bfloat16):
        cost = block_cost(source.family(), source.config(dtype), dtype)
        span = BlockSpan.load(source, 2, 5, dtype=dtype)
        held = sum(t.numel() * t.element_size() for b in span.blocks for t in (*b.parameters(), *b.buffers()))
        assert cost.weights * 3 == held
        assert cost.cache_per_token * 3 * 100 == span.new_cache(1, 100).nbytes()


@pytest.mark.parametrize("text,expected", [("4GiB", 4 << 30), ("512MiB", 512 << 20), ("8GB", 8 * 10**9),
                                           ("1.5g", 1_500_000_000), ("1000", 1000), (" 2 kib ", 2048)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "4 GiBs", "-1GiB", "0", "1e9", "GiB"])
def test_parse_memory_refuses(text):
    with pytest.raises(ConfigError, match="--max-memory must be"):
        parse_memory(text)


@pytest.mark.parametrize("text,expected", [("auto", "auto"), ("EVAL", "eval"), ("250", 250.0), ("0.5", 0.5)])
def test_parse_throughput(text, expected):
    assert parse_throughput(text) == expected


@pytest.mark.parametrize("text", ["", "fast", "0", "-3", "nan", "inf"])
def test_parse_throughput_refuses(text):
    with pytest.raises(ConfigError, match="--throughput must be auto, eval or a positive number"):
        parse_throughput(text)


@pytest.mark.parametrize("args,message,code", [
    (["--blocks", "0:2", "--num-blocks", "2"], "--blocks and --num-blocks do not go together", 2),
    (["--num-blocks", "0"], "--num-blocks must be at least 1", 2),
    (["--num-blocks", "9"], "--num-blocks 9 is more than the model's 8 blocks", 2),
    (["--max-memory", "lots"], "--max-memory must be a size like 4GiB", 2),
    (["--throughput", "fast"], "--throughput must be auto, eval or a positive number", 2),
    (["--balance-quality", "1.5"], "--balance-quality must be in (0, 1], got 1.5", 2),
    (["--balance-period", "0"], "--balance-period must be more than 0", 2),
    (["--move-drain", "-1"], "--move-drain must be 0 or more", 2),
    (["--bandwidth", "0"], "--bandwidth must be a positive number", 2),
    (["--max-memory", "1MiB"], "holds no block of this model", 1),
    (["--num-blocks", "6", "--max-memory", "400MiB", "--cache-tokens", "200000"], "does not fit in --max-memory", 1),
])
def test_bad_placement_options_are_one_clear_line(model8, tmp_path, args, message, code):
    result = fork_swarm("serve", str(model8), "--host", "127.0.0.1", "--no-mdns", *args, env=swarm_env(tmp_path),
                        timeout=60)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_balance_settings_refuse_bad_values():
    for bad in (dict(period=0), dict(quality=0), dict(quality=1.01), dict(confirmations=0), dict(drain=-1)):
        with pytest.raises(ConfigError):
            BalanceSettings(**bad)


# --- the moves field of records ---------------------------------------------------------------------------------------

def _record(identity: Identity, **fields) -> ServerRecord:
    return ServerRecord(peer_id=identity.peer_id, model="m", start=0, end=4, num_blocks=8, hidden_size=64,
                        addresses=("tcp://127.0.0.1:5000",), seq=1, **fields)


def test_moves_is_optional_signed_and_old_records_still_parse():
    identity = Identity()
    still = sign_record(_record(identity), identity)
    wire = record_to_wire(still)
    assert "moves" not in wire  # a server that never moved sends what an older server sends, signed the same way
    assert record_from_wire(wire) == still and record_from_wire(msgpack.unpackb(msgpack.packb(wire))).moves == 0

    moved = sign_record(_record(identity, moves=3), identity)
    wire = msgpack.unpackb(msgpack.packb(record_to_wire(moved)))
    assert wire["moves"] == 3 and record_from_wire(wire).moves == 3
    with pytest.raises(ProtocolError, match="does not match its fields"):  # the count is signed like the rest
        record_from_wire({**wire, "moves": 0})
    for bad in (-1, "3", 1.5, True, 1 << 40):
        with pytest.raises(ProtocolError, match="moves"):
            record_from_wire({**record_to_wire(_record(Identity())), "peer_id": "ab" * 8, "moves": bad})


# --- moving ---------------------------------------------------------------------------------------------------------

def connect(model_dir, first, servers: int):
    config = ClientConfig(gossip_period=0.1, wait_for_blocks=20.0, connect_timeout=2.0, request_timeout=20.0)
    model = AutoDistributedModelForCausalLM.from_pretrained(str(model_dir), initial_peers=[first.endpoint],
                                                            config=config)
    assert model.blocks.discovery.wait(lambda _: len(model.blocks.servers()) == servers, 15)
    return model


@pytest.mark.parametrize("memory", [None, 280_000_000], ids=["load-then-free", "free-then-load"])
def test_generation_through_a_server_that_moves_is_exact(model8, ref8, start_server, memory):
    """A server of the session's route moves (drains, loads, swaps) mid-generation: the tokens are plain
    transformers' greedy ones, the session recovers, and the move is counted, announced and explained."""
    fast = dict(discovery=fast_discovery(), balance=BalanceSettings(drain=0.2), max_memory=memory)
    first = start_server(model8, (0, 4), **fast)
    movers = [start_server(model8, (4, 8), initial_peers=[first.endpoint], **fast) for _ in range(2)]
    by_endpoint = {s.endpoint: s for s in movers}
    states, moving = [], []
    expected = ref8.generate(PROMPT, max_new_tokens=12, do_sample=False)
    model = connect(model8, first, 3)
    with model, model.inference_session(max_length=32) as session:
        real_step, steps = session.step, [0]

        def step(*args, **kwargs):
            if steps[0] == 3:
                hop = next(h.hop for h in session.hops if h.hop.start <= 4 < h.hop.end)
                mover = by_endpoint[hop.peer]
                real_publish = mover._publish
                mover._publish = lambda: states.append(mover.state) or real_publish()
                moving.append((mover, threading.Thread(target=mover.move, args=(0, 4, "test"))))
                moving[0][1].start()
            steps[0] += 1
            time.sleep(0.1)  # slow steps: the move's drain ends mid-generation
            return real_step(*args, **kwargs)

        session.step = step
        got = model.generate(PROMPT, max_new_tokens=12, do_sample=False)
        assert session.recoveries >= 1
    mover, thread = moving[0]
    thread.join(20)
    assert got.tolist() == expected.tolist()
    assert states == (["draining", "online"] if memory is None else ["draining", "joining", "online"])
    record = mover.record()
    assert (record.start, record.end, record.state, record.moves) == (0, 4, "online", 1)
    assert record_from_wire(record_to_wire(record)).moves == 1
    info = mover.handler.info()
    assert (info["start"], info["end"], info["moves_total"]) == (0, 4, 1)
    assert info["moves"][0]["from"] == [4, 8] and info["moves"][0]["to"] == [0, 4]
    assert info["moves"][0]["reason"] == "test" and info["moves"][0]["sessions_closed"] == 1
    # it serves its new blocks: a forward through them equals the reference's
    with AutoDistributedModelForCausalLM.from_pretrained(str(model8), initial_peers=[mover.endpoint],
                                                         config=ClientConfig(gossip_period=0.1)) as again:
        assert again.generate(PROMPT, max_new_tokens=4, do_sample=False).tolist() == expected[:, :11].tolist()


# --- choosing and rebalancing ---------------------------------------------------------------------------------------

AUTO = dict(throughput=100.0, discovery=fast_discovery(),
            balance=BalanceSettings(period=0.2, min_interval=0.0, drain=0.2))
FAST_CLI = ["--host", "127.0.0.1", "--no-mdns", "--gossip-period", "0.1", "--record-ttl", "1.5", "--throughput", "100"]


def spans(servers) -> list[tuple[int, int]]:
    return sorted(s.blocks for s in servers)


def covered(servers, num_blocks: int = 8) -> bool:
    return all(any(a <= b < z for a, z in spans(servers)) for b in range(num_blocks))


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_servers_started_without_blocks_cover_the_model(model8, ref8, start_server):
    """Three servers that may hold 4 of the 8 blocks each (two of them started at the same instant) choose spans
    that cover the model, and a generation through them is exact."""
    first = start_server(model8, None, num_blocks=4, **AUTO)
    with ThreadPoolExecutor(2) as pool:
        others = list(pool.map(lambda _: start_server(model8, None, num_blocks=4, initial_peers=[first.endpoint],
                                                      **AUTO), range(2)))
    servers = [first, *others]
    assert all(end - start == 4 for start, end in spans(servers))
    assert wait_until(lambda: covered(servers), 10), spans(servers)
    for server in servers:
        record = server.record()
        assert record.state == "online" and (record.start, record.end) == server.blocks
        assert server.handler.info()["placement"] == "automatic"
    model = connect(model8, first, 3)
    with model:
        got = model.generate(PROMPT, max_new_tokens=6, do_sample=False)
    assert got.tolist() == ref8.generate(PROMPT, max_new_tokens=6, do_sample=False).tolist()


def test_a_server_that_joins_takes_the_weakest_blocks(model8, start_server):
    strong = start_server(model8, (0, 8), throughput=100.0, discovery=fast_discovery())
    start_server(model8, (0, 4), throughput=300.0, discovery=fast_discovery(), initial_peers=[strong.endpoint])
    assert strong.discovery.wait(lambda records: len(records) == 2, 10)
    joiner = start_server(model8, None, num_blocks=4, initial_peers=[strong.endpoint], **AUTO)
    assert joiner.blocks == (4, 8)  # 4:8 has 100 tokens/s, 0:4 has 400
    time.sleep(1.0)  # five balance periods: the swarm is as good as it gets, the joiner stays
    assert joiner.blocks == (4, 8) and joiner.moves == 0
    settled = start_server(model8, None, num_blocks=4, initial_peers=[strong.endpoint],
                           **{**AUTO, "balance": BalanceSettings(rebalance=False)})
    assert settled.blocks == (4, 8)  # still the weakest: 4:8 has 200 tokens/s now, 0:4 has 400
    assert settled._balancer is None and settled.handler.info()["placement"] == "automatic"


def test_a_server_that_dies_leaves_a_gap_that_another_fills(model8, start_server, fork_serve):
    dying = fork_serve(str(model8), "--blocks", "0:4", *FAST_CLI)
    mover = start_server(model8, None, num_blocks=4, initial_peers=[dying.endpoint], **AUTO)
    assert mover.blocks == (4, 8)  # the gap when it started
    keeper = start_server(model8, (4, 8), throughput=100.0, discovery=fast_discovery(),
                          initial_peers=[mover.endpoint])
    assert mover.discovery.wait(lambda records: len(records) == 3, 10)
    time.sleep(1.0)  # five balance periods with 0:4 and 4:8 covered: no move
    assert mover.moves == 0
    dying.stop(signal.SIGKILL)  # no goodbye: its record expires after its ttl
    assert wait_until(lambda: mover.blocks == (0, 4) and mover.state == "online", 15), mover.blocks
    assert mover.moves == 1 and covered([mover, keeper])
    move = mover.handler.info()["moves"][0]
    assert move["from"] == [4, 8] and move["to"] == [0, 4] and "no server" in move["reason"]
    assert keeper.discovery.wait(lambda records: any(r.peer_id == mover.peer_id and r.moves == 1
                                                     and (r.start, r.end) == (0, 4) for r in records), 10)


def test_a_silent_server_stops_counting_for_placement_before_its_record_expires(model8, start_server):
    """A server that crashed without a goodbye keeps its record until the record's ttl (here 10 minutes); placement
    leaves it out as soon as gossip suspects it (no newer record for a few periods), so the blocks it held count as
    the gap they are."""
    server = start_server(model8, (4, 8), discovery=fast_discovery(period=0.5, ttl=5.0))  # suspected after 1.5 s
    ghost_key = Identity()
    ghost = sign_record(ServerRecord(ghost_key.peer_id, server.model_id, 0, 4, 8, 64, ("tcp://127.0.0.1:9",),
                                     throughput=100.0, seq=1, ttl=600.0), ghost_key)
    assert server.discovery.membership.merge([ghost]) == 1
    assert ghost.peer_id in {s.peer_id for s in server.placement_view()}  # just heard: it counts
    assert wait_until(lambda: ghost.peer_id not in {s.peer_id for s in server.placement_view()}, 10)
    assert server.discovery.membership.get(ghost.peer_id) is not None  # still held, not expired


def test_a_move_whose_new_span_fails_to_load_stays_where_it_was(model8, start_server, monkeypatch):
    for memory in (None, 280_000_000):  # loading first, then freeing first (the old span is loaded again)
        server = start_server(model8, (4, 8), discovery=fast_discovery(), max_memory=memory,
                              balance=BalanceSettings(drain=0.0))
        def load(start, end, real_load=server._load):
            if (start, end) == (0, 4):
                raise OSError("disk on fire")
            return real_load(start, end)

        monkeypatch.setattr(server, "_load", load)
        server.move(0, 4, "test")
        record = server.record()
        assert (record.start, record.end, record.state, record.moves) == (4, 8, "online", 0)
        assert server.handler.accepting and (server.span.start, server.span.end) == (4, 8) and server.moves == 0


def test_serve_without_blocks_from_the_command_line(model8, fork_serve, tmp_path):
    """`swarm serve MODEL --num-blocks 4`: measures its throughput once (cached under $SWARM_CACHE_DIR, read by the
    next server), chooses with the swarm's records in view, and says what it chose."""
    cli = [arg for arg in FAST_CLI if arg not in ("--throughput", "100")]
    first = fork_serve(str(model8), "--num-blocks", "4", "--balance-period", "0.2", *cli)
    cache = json.loads((tmp_path / "cache" / "throughput.json").read_text())
    [(key, entry)] = cache.items()
    assert key.startswith(f"{model8.name}|float32|cpu")
    second = fork_serve(str(model8), "--num-blocks", "4", *cli, "--initial-peers", first.endpoint)
    assert json.loads((tmp_path / "cache" / "throughput.json").read_text()) == cache  # read, not measured again
    from swarm.transport.discovery import Discovery

    with Discovery([first.endpoint, second.endpoint], fast_discovery()) as discovery:
        assert discovery.wait(lambda records: len(records) == 2 and all(r.state == "online" for r in records), 10)
        records = discovery.records()
    link = tp.network_tps(tp.DEFAULT_BANDWIDTH, 64, torch.float32)  # 100 Mbit/s carry 48828 tokens/s of 64 floats
    announced = tp.Throughput(entry["forward_tps"], entry["inference_sps"], link).announced(4)
    assert [r.throughput for r in records] == [announced, announced]
    # the second chose with the first's record in view: what the policy answers for that swarm
    [one] = [r for r in records if second.endpoint in r.addresses]
    [other] = [r for r in records if r is not one]
    expected = choose_span([ServerLoad(other.peer_id, other.start, other.end, other.throughput)], 8, 4, announced,
                           me=one.peer_id)
    assert (one.start, one.end) == expected and other.end - other.start == 4
    assert "(chosen; moves when the swarm needs)" in first.log_path.read_text()
