"""Many clients at once through real servers on loopback: each gets exactly the tokens it gets alone, while the
servers run their steps together in shared passes; a client killed mid-batch hurts nobody."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import torch

from swarm import AutoDistributedModelForCausalLM
from swarm.core.client.config import ClientConfig
from swarm.core.server.handler import HandlerLimits
from swarm.transport.rpc import RpcClient

# (prompt, new tokens): different lengths, so prefills and decodes of different sessions meet in passes
WORK = [([5, 17, 99, 3], 14), ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 6), ([42], 12), ([7, 7, 7, 7, 7, 7], 9),
        ([100, 3, 64, 12, 9], 11), ([31, 41, 59, 26, 53, 58, 97, 93, 23, 84, 62, 64, 33], 8)]


def _generate_together(path, endpoints, work, configs) -> list[list[int]]:
    models = [AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=endpoints, config=config)
              for config in configs]
    results: list = [None] * len(work)
    barrier = threading.Barrier(len(work))

    def run(i: int) -> None:
        prompt, new = work[i]
        barrier.wait(30)
        try:
            results[i] = models[i].generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False)[0].tolist()
        except Exception as e:  # reported below, with the others' results
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(work))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert not any(t.is_alive() for t in threads), "a client did not finish"
    finally:
        for model in models:
            model.close()
    return results


def _expected(ref, work) -> list[list[int]]:
    return [ref.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False)[0].tolist() for p, n in work]


def test_concurrent_clients_get_their_solo_tokens_from_shared_passes(tiny_llama, tiny_llama_ref, start_server):
    servers = [start_server(tiny_llama, span) for span in ((0, 3), (3, 6))]
    endpoints = [s.endpoint for s in servers]
    configs = [ClientConfig(relay=i % 2 == 1) for i in range(len(WORK))]  # relayed and hop-by-hop steps mixed
    results = _generate_together(tiny_llama, endpoints, WORK, configs)
    assert results == _expected(tiny_llama_ref, WORK)
    for server in servers:
        with RpcClient(server.endpoint) as client:
            info = client.call("info").fields
        assert info["batch"]["peak_sessions"] >= 2, info["batch"]  # steps of different sessions did share passes
        assert info["queue"] == 0 and info["queued_bytes"] == 0


def test_batching_off_gives_the_same_tokens(tiny_llama, tiny_llama_ref, start_server):
    servers = [start_server(tiny_llama, span, batching=False) for span in ((0, 3), (3, 6))]
    work = WORK[:3]
    results = _generate_together(tiny_llama, [s.endpoint for s in servers], work, [ClientConfig()] * len(work))
    assert results == _expected(tiny_llama_ref, work)
    with RpcClient(servers[0].endpoint) as client:
        assert client.call("info").fields["batch"]["peak_sessions"] == 1


KILLED_CLIENT = textwrap.dedent("""
    import sys, torch
    from swarm import AutoDistributedModelForCausalLM
    model = AutoDistributedModelForCausalLM.from_pretrained(sys.argv[1], initial_peers=sys.argv[2:])
    print("ready", flush=True)
    with model.inference_session(max_length=400):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=390, do_sample=False)
""")


def test_a_client_killed_mid_batch_hurts_nobody(tiny_llama, tiny_llama_ref, start_server, tmp_path):
    limits = HandlerLimits(session_timeout=3.0)
    servers = [start_server(tiny_llama, span, limits=limits) for span in ((0, 3), (3, 6))]
    endpoints = [s.endpoint for s in servers]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    victim = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, str(tiny_llama), *endpoints], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        with RpcClient(endpoints[0]) as probe:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and probe.call("info").fields["passes"] < 20:
                time.sleep(0.05)  # until it is generating
            assert probe.call("info").fields["sessions"] == 1
            os.killpg(victim.pid, signal.SIGKILL)  # mid-generation: its steps may be queued or running
            victim.wait(10)
            work = WORK[:3]
            results = _generate_together(tiny_llama, endpoints, work, [ClientConfig()] * len(work))
            assert results == _expected(tiny_llama_ref, work)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and probe.call("info").fields["sessions"] > 0:
                time.sleep(0.1)
            info = probe.call("info").fields
            assert info["sessions"] == 0 and info["cache_tokens_free"] == info["cache_tokens_total"]
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait(10)
