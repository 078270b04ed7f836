"""Pure policies over snapshots: chain planning, block coverage, model names."""

from __future__ import annotations

import random

import pytest

from swarm.core.aliases import ALIASES, announced_id, matches, resolve_alias
from swarm.core.client.routing import Hop, MissingBlocks, SpanInfo, plan_forward, plan_inference
from swarm.core.coverage import model_coverage, models_served
from swarm.transport.records import ServerRecord


def span(peer, start, end, rtt=0.001, throughput=1000.0, cache_free=None):
    return SpanInfo(peer, start, end, rtt=rtt, throughput=throughput, cache_free=cache_free)


@pytest.mark.parametrize("spans,expected", [
    ([span("a", 0, 8)], [("a", 0, 8)]),
    ([span("a", 0, 4), span("b", 4, 8)], [("a", 0, 4), ("b", 4, 8)]),
    # one fast server for everything beats two hops
    ([span("a", 0, 4), span("b", 4, 8), span("c", 0, 8)], [("c", 0, 8)]),
    # a far server (100 ms round trip) is avoided when near ones cover the blocks
    ([span("far", 0, 8, rtt=0.1), span("a", 0, 4), span("b", 4, 8)], [("a", 0, 4), ("b", 4, 8)]),
    # a slow server (10 tokens/s through its span) is avoided, even at the cost of a hop
    ([span("slow", 0, 8, throughput=10), span("a", 0, 4), span("b", 4, 8)], [("a", 0, 4), ("b", 4, 8)]),
    # a hop may use part of a server's span: blocks 0:2 on a, the rest on fast b
    ([span("a", 0, 4, throughput=50), span("b", 2, 8, throughput=5000)], [("a", 0, 2), ("b", 2, 8)]),
    # unmeasured round trips count as DEFAULT_RTT
    ([span("unknown", 0, 8, rtt=None), span("near", 0, 8, rtt=0.0001)], [("near", 0, 8)]),
])
def test_plan_inference_lowest_expected_step_time(spans, expected):
    assert plan_inference(spans, 0, 8) == [Hop(*e) for e in expected]


def test_plan_inference_prefers_servers_with_cache_room():
    spans = [span("full", 0, 8, cache_free=10), span("roomy", 0, 8, rtt=0.05, cache_free=10_000)]
    assert plan_inference(spans, 0, 8, cache_needed=512) == [Hop("roomy", 0, 8)]
    # when only full servers cover a block, they are tried anyway (their open answers whether they are full)
    spans = [span("full", 0, 8, cache_free=10), span("roomy", 0, 4, cache_free=10_000)]
    assert plan_inference(spans, 0, 8, cache_needed=512) == [Hop("full", 0, 8)]


def test_plan_forward_spreads_by_throughput():
    spans = [span("fast", 0, 8, throughput=3000), span("slow", 0, 8, throughput=1000)]
    rng = random.Random(0)
    picks = [plan_forward(spans, 0, 8, rng)[0].peer for _ in range(2000)]
    assert 0.7 < picks.count("fast") / len(picks) < 0.8
    chain = plan_forward([span("a", 0, 3), span("b", 3, 8)], 0, 8, rng)
    assert chain == [Hop("a", 0, 3), Hop("b", 3, 8)]


@pytest.mark.parametrize("spans,missing", [
    ([], [(0, 8)]),
    ([("a", 0, 3), ("b", 5, 8)], [(3, 5)]),
    ([("a", 1, 7)], [(0, 1), (7, 8)]),
])
@pytest.mark.parametrize("planner", [plan_inference, plan_forward])
def test_planners_name_missing_blocks(spans, missing, planner):
    with pytest.raises(MissingBlocks) as info:
        planner([span(*s) for s in spans], 0, 8)
    assert info.value.missing == missing
    assert f"{missing[0][0]}:{missing[0][1]}" in str(info.value)


def record(i: int, start: int, end: int, throughput: float = 10.0, state: str = "online", model: str = "m",
           num_blocks: int = 6) -> ServerRecord:
    return ServerRecord(peer_id=f"{i + 1:016x}", model=model, start=start, end=end, num_blocks=num_blocks,
                        hidden_size=8, addresses=(f"tcp://127.0.0.1:{9000 + i}",), state=state,
                        throughput=throughput)


def test_coverage_counts_servers_and_bottleneck():
    records = [record(0, 0, 3, 10), record(1, 2, 6, 4), record(2, 4, 6, 1), record(3, 0, 6, 100, state="offline"),
               record(4, 0, 6, 100, model="other")]
    cov = model_coverage("m", records)
    assert [b.servers for b in cov.blocks] == [1, 1, 2, 1, 2, 2]
    assert [b.throughput for b in cov.blocks] == [10, 10, 14, 4, 5, 5]
    assert cov.complete and cov.missing == []
    assert cov.bottleneck == 4 and cov.weakest == 3
    assert models_served(records) == ["m", "other"]


def test_coverage_gaps():
    cov = model_coverage("m", [record(0, 0, 2), record(1, 4, 5)])
    assert cov.missing == [(2, 4), (5, 6)] and not cov.complete and cov.bottleneck == 0


def test_aliases_and_announced_ids(tmp_path):
    assert resolve_alias("llama-2-70b") == "meta-llama/Llama-2-70b-hf" == ALIASES["llama-2-70b"]
    assert resolve_alias("LLAMA-2-70B") == "meta-llama/Llama-2-70b-hf"
    assert resolve_alias("org/unknown") == "org/unknown"
    local = tmp_path / "my-llama"
    local.mkdir()
    assert announced_id(str(local)) == "my-llama"
    assert matches(str(local), "my-llama") and not matches(str(local), "llama")
    assert matches("llama-2-70b", "meta-llama/Llama-2-70b-hf")
    assert matches("meta-llama/Llama-2-70b-hf", "meta-llama/Llama-2-70b-hf")
    assert not matches("llama-2-7b", "meta-llama/Llama-2-70b-hf")


# --- bans: capped exponential backoff, forgiven on an answer (Peers over an in-memory discovery) ------------------


class MemoryDiscovery:
    """The part of Discovery that Peers reads, over a fixed list of records."""

    def __init__(self, records):
        self._records = list(records)

    def records(self, predicate=None):
        return [r for r in self._records if predicate is None or predicate(r)]

    def wait(self, predicate, timeout, poll=0.05):
        return predicate(self._records)

    def stop(self, offline=None):
        pass


def test_bans_back_off_exponentially_up_to_the_cap_and_are_forgiven():
    from swarm.core.client.config import ClientConfig
    from swarm.core.client.peers import Peers

    now = [1000.0]
    a, b = record(0, 0, 6), record(1, 0, 6)
    peers = Peers(6, 8, MemoryDiscovery([a, b]), config=ClientConfig(ban_time=2.0, max_ban_time=10.0),
                  owns_discovery=False, clock=lambda: now[0])
    try:
        peer = a.addresses[0]
        for failures, ban in enumerate([2.0, 4.0, 8.0, 10.0, 10.0], start=1):
            peers.ban(peer, RuntimeError("gone"))
            assert peers.failures(peer) == failures and peers.banned(peer)
            assert [r.peer_id for r in peers.servers()] == [b.peer_id]
            now[0] += ban - 0.01
            assert peers.banned(peer)
            now[0] += 0.02
            assert not peers.banned(peer) and len(peers.servers()) == 2
        peers._forgive(peer)  # what a successful call does
        assert peers.failures(peer) == 0
        peers.ban(peer, RuntimeError("gone again"))
        now[0] += 2.01
        assert not peers.banned(peer)
    finally:
        peers.close()


def test_bans_from_many_threads_count_every_failure():
    from concurrent.futures import ThreadPoolExecutor

    from swarm.core.client.config import ClientConfig
    from swarm.core.client.peers import Peers

    a = record(0, 0, 6)
    peers = Peers(6, 8, MemoryDiscovery([a]), config=ClientConfig(), owns_discovery=False)
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: peers.ban(a.addresses[0], RuntimeError("x")), range(400)))
        assert peers.failures(a.addresses[0]) == 400 and peers.servers() == []
    finally:
        peers.close()
