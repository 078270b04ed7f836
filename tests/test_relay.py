"""Server-to-server relay: exact tokens, one client round trip per step, recovery when a relayed hop dies."""

from __future__ import annotations

import signal
import time

import pytest
from conftest import load_reference, make_tiny_model
from test_recovery import FAST, PROMPT, start_all

from swarm import AutoDistributedModelForCausalLM
from swarm.core.client.config import ClientConfig


@pytest.fixture
def model_dir(tmp_path):
    return make_tiny_model(tmp_path / f"relay-{tmp_path.name[-10:]}", layers=6, seed=41)


def connect(model_dir, first, expected, **config):
    config = ClientConfig(gossip_period=0.2, wait_for_blocks=30.0, relay=True, **config)
    model = AutoDistributedModelForCausalLM.from_pretrained(str(model_dir), initial_peers=[first.endpoint],
                                                            config=config)
    assert model.blocks.discovery.wait(lambda _: len(model.blocks.servers()) == expected, 15)
    return model


def count_calls(model):
    calls = []
    real = model.blocks.call

    def call(hop, msg_type, *args, **kwargs):
        calls.append((msg_type, hop.peer))
        return real(hop, msg_type, *args, **kwargs)

    model.blocks.call = call
    return calls


@pytest.mark.slow
def test_relayed_generation_is_exact_and_uses_one_round_trip_per_step(model_dir, serve_process):
    ref = load_reference(model_dir)
    first = serve_process(str(model_dir), "--blocks", "0:2", *FAST)
    start_all(serve_process, model_dir, [(2, 4), (4, 6)], [first.endpoint])
    # the servers must know each other to relay: wait until the first knows all three
    model = connect(model_dir, first, 3)
    calls = count_calls(model)
    with model:
        expected = ref.generate(PROMPT, max_new_tokens=8, do_sample=False)
        got = model.generate(PROMPT, max_new_tokens=8, do_sample=False)
        assert got.tolist() == expected.tolist()
    steps = [peer for kind, peer in calls if kind == "step"]
    assert len(steps) == 8 and set(steps) == {first.endpoint}  # every step went to the first server only


@pytest.mark.slow
def test_relay_recovers_a_dead_downstream_server(model_dir, serve_process):
    ref = load_reference(model_dir)
    first = serve_process(str(model_dir), "--blocks", "0:2", *FAST)
    middles = start_all(serve_process, model_dir, [(2, 4), (2, 4)], [first.endpoint])
    start_all(serve_process, model_dir, [(4, 6)], [first.endpoint])
    model = connect(model_dir, first, 4)
    expected = ref.generate(PROMPT, max_new_tokens=10, do_sample=False)
    with model, model.inference_session(max_length=32) as session:
        # kill the middle server of the route right before step 4, while the client only talks to the first
        state = {"steps": 0}
        real_step = session.step

        def step(hidden, mask=None):
            if state["steps"] == 4:
                middle = next(h for h in session.route if h.start == 2)
                next(s for s in middles if s.endpoint == middle.peer).stop(signal.SIGKILL)
                time.sleep(0.05)
            state["steps"] += 1
            return real_step(hidden, mask)

        session.step = step
        got = model.generate(PROMPT, max_new_tokens=10, do_sample=False)
        assert session.recoveries == 1
    assert got.tolist() == expected.tolist()


def test_relay_refused_by_strangers_falls_back_to_hop_by_hop(tiny_llama, tiny_llama_ref, start_server):
    # in-process servers started without peers do not know each other, so they refuse to relay
    servers = [start_server(tiny_llama, span) for span in ((0, 3), (3, 6))]
    config = ClientConfig(relay=True)
    model = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_llama), initial_peers=[s.endpoint for s in
                                                                                            servers], config=config)
    with model:
        expected = tiny_llama_ref.generate(PROMPT, max_new_tokens=6, do_sample=False)
        assert model.generate(PROMPT, max_new_tokens=6, do_sample=False).tolist() == expected.tolist()


