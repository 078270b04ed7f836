"""Discovery end to end: gossip between subprocess servers, mDNS on 127.0.0.1, expiry, `swarm status`."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import fork_swarm, load_reference, make_tiny_model, swarm_env

from swarm import AutoDistributedModelForCausalLM
from swarm.core.server import Server, ServerConfig
from swarm.transport.discovery import Discovery, DiscoveryConfig
from swarm.transport.errors import BadRequest
from swarm.transport.gossip import GossipConfig
from swarm.transport.mdns import MdnsSettings
from swarm.transport.records import ServerRecord, record_to_wire
from swarm.transport.rpc import RpcClient

FAST = ["--host", "127.0.0.1", "--no-mdns", "--gossip-period", "0.2", "--record-ttl", "2"]
LOOPBACK_MDNS = MdnsSettings(enabled=True, interfaces=("127.0.0.1",))


def table(endpoint: str) -> dict[str, dict]:
    """A server's view of the swarm: peer id -> record (as gossiped)."""
    with RpcClient(endpoint) as client:
        reply = client.call("gossip", {"records": []}, timeout=5)
    return {r["peer_id"]: r for r in reply.fields["records"]}


def wait_until(predicate, timeout: float, poll: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return predicate()


@pytest.fixture
def model_dir(tmp_path):
    return make_tiny_model(tmp_path / f"disc-{tmp_path.name[-12:]}", layers=4, seed=11)


@pytest.mark.slow
def test_servers_find_each_other_through_one_initial_peer(model_dir, fork_serve):
    first = fork_serve(str(model_dir), "--blocks", "0:2", *FAST)
    second = fork_serve(str(model_dir), "--blocks", "2:4", "--initial-peers", first.endpoint, *FAST)
    third = fork_serve(str(model_dir), "--blocks", "1:3", "--initial-peers", first.endpoint, *FAST)
    servers = [first, second, third]
    # every server knows all three (the first learns of the others only from their pushes, the others via gossip)
    assert wait_until(lambda: all(len(table(s.endpoint)) == 3 for s in servers), timeout=15)
    views = [table(s.endpoint) for s in servers]
    assert views[0].keys() == views[1].keys() == views[2].keys()
    spans = sorted((r["start"], r["end"]) for r in views[0].values())
    assert spans == [(0, 2), (1, 3), (2, 4)]
    assert all(r["state"] == "online" and r["model"] == model_dir.name for r in views[0].values())

    # a graceful stop is seen as offline at once
    second_id = next(pid for pid, r in views[0].items() if r["start"] == 2)
    assert second.stop(signal.SIGTERM) == 0
    assert wait_until(lambda: table(first.endpoint)[second_id]["state"] == "offline", timeout=1.5)
    assert wait_until(lambda: table(third.endpoint)[second_id]["state"] == "offline", timeout=1.5)

    # a killed server drops out of every view within its record's ttl (2 s) plus a few gossip periods
    third_id = next(pid for pid, r in views[0].items() if r["start"] == 1)
    first_id = next(pid for pid, r in views[0].items() if r["start"] == 0)
    third.stop(signal.SIGKILL)
    listener = Discovery([first.endpoint], DiscoveryConfig(mdns=MdnsSettings(enabled=False),
                                                           gossip=GossipConfig(period=0.2))).start()
    try:
        assert wait_until(lambda: third_id not in table(first.endpoint), timeout=5)
        assert wait_until(lambda: third_id not in {r.peer_id for r in listener.records()}, timeout=5)
        assert {r.peer_id for r in listener.records()} == {first_id}  # the offline one is not listed either
    finally:
        listener.stop()


@pytest.mark.slow
def test_client_without_peers_finds_servers_by_mdns(tmp_path):
    path = make_tiny_model(tmp_path / f"mdns-{tmp_path.name[-12:]}", layers=4, seed=12)
    ref = load_reference(path)
    discovery = DiscoveryConfig(mdns=LOOPBACK_MDNS, gossip=GossipConfig(period=0.2), record_ttl=3)
    servers = [Server(ServerConfig(str(path), span, host="127.0.0.1", discovery=discovery))
               for span in ((0, 2), (2, 4))]
    try:
        with ThreadPoolExecutor(2) as pool:  # each announcement probes the network for ~1.5 s: both at once
            list(pool.map(Server.start, servers))
        model = AutoDistributedModelForCausalLM.from_pretrained(str(path), mdns=True, mdns_interface="127.0.0.1")
        with model:
            ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
            expected = ref.generate(ids, max_new_tokens=8, do_sample=False)
            assert model.generate(ids, max_new_tokens=8, do_sample=False).tolist() == expected.tolist()
            assert {h.peer for h in model.blocks.plan()} == {s.addresses[0] for s in servers}
    finally:
        for server in servers:
            server.stop()


def test_bad_records_do_not_poison_views(model_dir, start_server):
    server = start_server(model_dir, (0, 4))
    good = ServerRecord(peer_id="ab" * 8, model="other", start=0, end=1, num_blocks=2, hidden_size=8,
                        addresses=("tcp://127.0.0.1:9",), seq=5, ttl=30)
    garbage = [
        "not a record",
        {"peer_id": "cd" * 8},  # incomplete
        {**record_to_wire(good), "peer_id": "ef" * 8, "model": "x" * 10_000},  # oversized
        {**record_to_wire(good), "peer_id": "12" * 8, "state": "zombie"},
        {**record_to_wire(good), "peer_id": "34" * 8, "addresses": ["http://evil"]},
        {**record_to_wire(good), "peer_id": "56" * 8, "addresses": ["tcp://*:1"]},  # ZeroMQ refuses these
        {**record_to_wire(good), "peer_id": "78" * 8, "addresses": ["tcp://a b:9"]},
        {**record_to_wire(good), "peer_id": "9a" * 8, "addresses": ["tcp://127.0.0.1:9", "tcp://a..b:9"]},
    ]
    with RpcClient(server.endpoint) as client:
        reply = client.call("gossip", {"records": [*garbage, record_to_wire(good)]}, timeout=5)
        ids = {r["peer_id"] for r in reply.fields["records"]}
        assert ids == {server.peer_id, good.peer_id}
        with pytest.raises(BadRequest):
            client.call("gossip", {"records": "all of them"}, timeout=5)
        # the server still serves, and its own record is intact
        assert client.call("info", timeout=5).fields["start"] == 0
    view = table(server.endpoint)
    assert view[server.peer_id]["state"] == "online" and view[good.peer_id]["seq"] == 5


def run_status(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return fork_swarm("status", *args, env=env, timeout=60)


@pytest.mark.slow
def test_status_lists_what_runs(model_dir, fork_serve, tmp_path):
    a = fork_serve(str(model_dir), "--blocks", "0:3", *FAST)
    b = fork_serve(str(model_dir), "--blocks", "1:4", "--initial-peers", a.endpoint, *FAST)
    assert wait_until(lambda: len(table(a.endpoint)) == 2, timeout=10)
    env = swarm_env(tmp_path)
    result = run_status("--initial-peers", b.endpoint, "--json", "--wait", "0.6", env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert sorted((s["start"], s["end"]) for s in data["servers"]) == [(0, 3), (1, 4)]
    assert {s["addresses"][0] for s in data["servers"]} == {a.endpoint, b.endpoint}
    (model,) = data["models"]
    assert model["model"] == model_dir.name and model["complete"] and model["servers_per_block"] == [1, 2, 2, 1]
    assert model["bottleneck_tokens_per_s"] > 0
    assert all("batching" in s["capabilities"] for s in data["servers"])

    # a's load reaches status through its record: the queue, and sessions and tokens per pass
    with RpcClient(a.endpoint) as client:
        client.call("forward", {"names": ["hidden"]}, [torch.zeros(2, 5, 64)])

    def a_batch() -> float:
        data = json.loads(run_status("--initial-peers", a.endpoint, "--json", "--wait", "0.6", env=env).stdout)
        return next(s["batch_tokens"] for s in data["servers"] if s["addresses"][0] == a.endpoint)

    assert wait_until(lambda: a_batch() == 10, timeout=20)
    result = run_status("--initial-peers", a.endpoint, "--wait", "0.6", env=env)
    assert result.returncode == 0, result.stderr
    assert "all blocks served" in result.stderr and model_dir.name in result.stderr
    assert "queue" in result.stderr and "0 sess, 10 tok" in result.stderr

    a.stop(signal.SIGTERM)
    result = run_status("--initial-peers", b.endpoint, "--json", "--wait", "0.6", env=env)
    data = json.loads(result.stdout)
    states = {s["start"]: s["state"] for s in data["servers"]}
    assert states[1] == "online" and states.get(0, "offline") == "offline"
    assert data["models"][0]["missing"] == [[0, 1]]


def test_chat_without_a_model_name_uses_or_lists_served_models(model_dir, fork_serve, tmp_path):
    from swarm.core.demo import build_demo_tokenizer

    tokenizer = build_demo_tokenizer()
    chat_dir = make_tiny_model(model_dir.parent / "chatty", layers=2, vocab=len(tokenizer), seed=4,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    tokenizer.save_pretrained(chat_dir)
    server = fork_serve(str(chat_dir), "--blocks", "0:2", *FAST)
    env = swarm_env(tmp_path)
    args = ["chat", "--initial-peers", server.endpoint, "--prompt", "hi", "--temperature", "0", "--max-new-tokens",
            "4"]
    # the server announces "chatty"; run where that name is a local directory
    result = fork_swarm(*args, env=env, cwd=chat_dir.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n")

    other = shutil.copytree(chat_dir, model_dir.parent / "chatty2")
    fork_serve(str(other), "--blocks", "0:2", "--initial-peers", server.endpoint, *FAST)
    assert wait_until(lambda: len(table(server.endpoint)) == 2, timeout=10)
    result = fork_swarm(*args, env=env, cwd=chat_dir.parent)
    assert result.returncode == 2
    assert "several models are served (chatty; chatty2)" in result.stderr
