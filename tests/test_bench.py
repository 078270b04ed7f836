"""`swarm bench`, simulated link latency, and `swarm chat --show-route`."""

from __future__ import annotations

import json
import time

import torch
from conftest import fork_swarm, make_tiny_model, swarm_env

from swarm.core.bench import all_chains
from swarm.core.client.routing import Hop, SpanInfo
from swarm.transport.rpc import RpcClient, RpcClientConfig


def test_bench_json_measures_servers_and_routes(tmp_path, start_server):
    path = make_tiny_model(tmp_path / f"bench-{tmp_path.name[-10:]}", layers=4, seed=31)
    servers = [start_server(path, span) for span in ((0, 4), (0, 2), (2, 4))]
    peers = [s.endpoint for s in servers]
    result = fork_swarm("bench", "--initial-peers", *peers, "--json", "--steps", "3", "--batch", "2", "--length", "8",
                        "--all-routes", "--wait", "0.5", env=swarm_env(tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["model"] == path.name and data["steps"] == 3
    assert {s["peer"] for s in data["servers"]} == set(peers)
    assert all(s["ping_ms"] > 0 and s["step_ms"] > 0 and s["error"] is None for s in data["servers"])
    routes = data["routes"]
    assert sum(r["chosen"] for r in routes) == 1 and routes[0]["chosen"]
    assert len(routes) == 3  # 0:4 alone, 0:2 -> 0:4's 2:4, 0:2 -> 2:4
    assert all(r["steps_per_s"] > 0 and r["forward_tokens_per_s"] > 0 for r in routes)


def test_all_chains_enumerates_alternatives():
    spans = [SpanInfo("a", 0, 4), SpanInfo("b", 0, 2), SpanInfo("c", 2, 4)]
    chains = all_chains(spans, 0, 4)
    assert [Hop("a", 0, 4)] in chains
    assert [Hop("b", 0, 2), Hop("c", 2, 4)] in chains
    assert [Hop("b", 0, 2), Hop("a", 2, 4)] in chains
    assert len(chains) == 3


def test_simulated_link_latency_and_bandwidth(tiny_llama, start_server):
    server = start_server(tiny_llama, (0, 1))
    fast = RpcClient(server.endpoint)
    slow = RpcClient(server.endpoint, RpcClientConfig(link_delay=0.02))
    narrow = RpcClient(server.endpoint, RpcClientConfig(link_bandwidth=1e6))  # 1 MB/s
    try:
        def timed(client, *args):
            started = time.perf_counter()
            client.call(*args)
            return time.perf_counter() - started

        fast.call("ping")
        assert timed(fast, "ping") < 0.02
        assert 0.04 <= timed(slow, "ping") < 0.2  # 20 ms each way
        hidden = torch.randn(4, 64, 64)  # 64 KiB each way at 1 MB/s: at least 0.13 s
        assert timed(narrow, "forward", {"names": ["hidden"]}, [hidden]) >= 0.13
    finally:
        for client in (fast, slow, narrow):
            client.close()
