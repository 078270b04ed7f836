"""Pure policies over snapshots: chain planning, block coverage, model names."""

from __future__ import annotations

import pytest

from swarm.core.aliases import ALIASES, announced_id, matches, resolve_alias
from swarm.core.client.routing import Hop, MissingBlocks, SpanInfo, plan_chain
from swarm.core.coverage import model_coverage, models_served
from swarm.transport.records import ServerRecord


@pytest.mark.parametrize("spans,expected", [
    ([("a", 0, 8)], [("a", 0, 8)]),
    ([("a", 0, 4), ("b", 4, 8)], [("a", 0, 4), ("b", 4, 8)]),
    # the furthest-reaching server wins, and a later hop may start inside another's span
    ([("a", 0, 3), ("b", 0, 5), ("c", 3, 8)], [("b", 0, 5), ("c", 5, 8)]),
    ([("a", 0, 2), ("b", 1, 6), ("c", 2, 8)], [("a", 0, 2), ("c", 2, 8)]),
    # equal reach: the less loaded one
    ([("busy", 0, 8, 5.0), ("idle", 0, 8, 1.0)], [("idle", 0, 8)]),
])
def test_plan_chain(spans, expected):
    infos = [SpanInfo(*s) for s in spans]
    assert plan_chain(infos, 0, 8) == [Hop(*e) for e in expected]


@pytest.mark.parametrize("spans,missing", [
    ([], [(0, 8)]),
    ([("a", 0, 3), ("b", 5, 8)], [(3, 5)]),
    ([("a", 1, 7)], [(0, 1), (7, 8)]),
])
def test_plan_chain_names_missing_blocks(spans, missing):
    with pytest.raises(MissingBlocks) as info:
        plan_chain([SpanInfo(*s) for s in spans], 0, 8)
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
