"""Fault tolerance: servers SIGKILLed in the middle of generate() and of forward/backward; exact recovery."""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import load_reference, make_tiny_model

from swarm import AutoDistributedModelForCausalLM
from swarm.core.client.config import ClientConfig
from swarm.core.client.routing import Hop, MissingBlocks
from swarm.transport.records import record_to_wire
from swarm.transport.rpc import RpcClient

FAST = ["--host", "127.0.0.1", "--no-mdns", "--gossip-period", "0.2", "--record-ttl", "3"]
PROMPT = torch.tensor([[7, 3, 9, 1, 4, 4, 2]])


@pytest.fixture
def model_dir(tmp_path):
    return make_tiny_model(tmp_path / f"ft-{tmp_path.name[-10:]}", layers=4, seed=21)


def start_all(fork_serve, model_dir, spans, peers=()):
    """Start servers for `spans` at once (each gossips with `peers`); returns them in order."""
    extra = ["--initial-peers", *peers] if peers else []
    with ThreadPoolExecutor(len(spans)) as pool:
        return list(pool.map(lambda span: fork_serve(str(model_dir), "--blocks", f"{span[0]}:{span[1]}",
                                                         *FAST, *extra), spans))


def connect(model_dir, first, expected_servers, **config):
    config = ClientConfig(gossip_period=0.2, **{"wait_for_blocks": 30.0, **config})
    model = AutoDistributedModelForCausalLM.from_pretrained(str(model_dir), initial_peers=[first.endpoint],
                                                            config=config)
    assert model.blocks.discovery.wait(lambda _: len(model.blocks.servers()) == expected_servers, 15)
    return model


class KillDuring:
    """SIGKILLs the server that holds `block` in a session's route, during the steps numbered in `at` (0 = first),
    after the step's request is on its way to the hops before it: the server dies mid-step."""

    def __init__(self, session, servers, at, block=2, then=None):
        self.by_endpoint, self.at, self.block, self.then = {s.endpoint: s for s in servers}, set(at), block, then
        self.steps, self.killed = 0, []
        real_step, real_step_hop = session.step, session._step_hop

        def step(hidden, mask=None, *args):
            try:
                return real_step(hidden, mask, *args)
            finally:
                self.steps += 1

        def step_hop(hop_session, hidden, mask, **kwargs):
            hop = hop_session.hop
            if self.steps in self.at and hop.start <= self.block < hop.end and hop.peer in self.by_endpoint:
                self.by_endpoint[hop.peer].stop(signal.SIGKILL)
                self.killed.append(hop.peer)
                self.at.discard(self.steps)  # once per listed step
                if self.then is not None:
                    self.then()
            return real_step_hop(hop_session, hidden, mask, **kwargs)

        session.step, session._step_hop = step, step_hop


@pytest.mark.slow
@pytest.mark.parametrize("at,batch", [(0, 1), (5, 2), (9, 1)], ids=["first-step", "middle-batch2", "last-step"])
def test_generation_survives_a_killed_server(model_dir, fork_serve, at, batch):
    ref = load_reference(model_dir)
    first = fork_serve(str(model_dir), "--blocks", "0:2", *FAST)
    others = start_all(fork_serve, model_dir, [(2, 4), (2, 4)], [first.endpoint])
    model = connect(model_dir, first, 3)
    ids = PROMPT if batch == 1 else torch.tensor([[0, 0, 5, 6, 7, 8, 9], [7, 3, 9, 1, 4, 4, 2]])
    mask = torch.ones_like(ids) if batch == 1 else torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    expected = ref.generate(ids, **kwargs)
    with model, model.inference_session(max_length=32) as session:
        killer = KillDuring(session, others, at=[at])
        got = model.generate(ids, **kwargs)
        assert session.recoveries == 1 and killer.steps == 10
    assert len(killer.killed) == 1
    assert got.tolist() == expected.tolist()


@pytest.mark.slow
def test_two_failures_in_one_generation_and_sampling_is_unchanged(model_dir, fork_serve):
    first = fork_serve(str(model_dir), "--blocks", "0:2", *FAST)
    others = start_all(fork_serve, model_dir, [(2, 4), (2, 4), (2, 4)], [first.endpoint])
    model = connect(model_dir, first, 4)
    sample = dict(max_new_tokens=12, do_sample=True, top_p=0.9, temperature=0.9)
    with model:
        torch.manual_seed(5)
        clean = model.generate(PROMPT, **sample)
        with model.inference_session(max_length=32) as session:
            killer = KillDuring(session, others, at=[3, 8])
            torch.manual_seed(5)
            recovered = model.generate(PROMPT, **sample)
            assert session.recoveries == 2
    assert len(set(killer.killed)) == 2
    assert recovered.tolist() == clean.tolist()


@pytest.mark.slow
def test_replacement_that_appears_after_the_failure(model_dir, fork_serve):
    ref = load_reference(model_dir)
    first = fork_serve(str(model_dir), "--blocks", "0:2", *FAST)
    (only,) = start_all(fork_serve, model_dir, [(2, 4)], [first.endpoint])
    model = connect(model_dir, first, 2)
    expected = ref.generate(PROMPT, max_new_tokens=8, do_sample=False)
    started: list = []

    def late_replacement():  # starts only once the only server of blocks 2:4 is dead
        started.append(fork_serve(str(model_dir), "--blocks", "2:4", *FAST, "--initial-peers", first.endpoint))

    thread = threading.Thread(target=late_replacement)
    with model, model.inference_session(max_length=32) as session:
        KillDuring(session, [only], at=[3], then=thread.start)
        got = model.generate(PROMPT, max_new_tokens=8, do_sample=False)
        assert session.recoveries == 1
    thread.join(120)
    assert started and got.tolist() == expected.tolist()


@pytest.mark.slow
def test_no_server_left_is_a_clear_error_after_the_wait(model_dir, fork_serve):
    first = fork_serve(str(model_dir), "--blocks", "0:2", *FAST)
    (only,) = start_all(fork_serve, model_dir, [(2, 4)], [first.endpoint])
    model = connect(model_dir, first, 2, wait_for_blocks=1.5)
    with model, model.inference_session(max_length=32) as session:
        KillDuring(session, [only], at=[2])
        with pytest.raises(MissingBlocks, match=r"blocks 2:4 after waiting 1.5 s"):
            model.generate(PROMPT, max_new_tokens=6, do_sample=False)


@pytest.mark.slow
def test_forward_and_backward_retry_on_another_server(model_dir, fork_serve):
    ref = load_reference(model_dir)
    first = fork_serve(str(model_dir), "--blocks", "0:2", *FAST)
    others = start_all(fork_serve, model_dir, [(2, 4), (2, 4)], [first.endpoint])
    model = connect(model_dir, first, 3)
    ids = PROMPT
    with model:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        dead, alive = others
        dead.stop(signal.SIGKILL)  # dies before the forward pass, while its record is still fresh
        real_plan = model.blocks.plan
        planned = []

        def plan_dead_first(start=0, end=None, kind="inference", cache_needed=0, adapter=None):
            chain = real_plan(start, end, kind, cache_needed, adapter)
            if kind == "forward" and not planned:  # the first forward chain goes through the dead server
                chain = [Hop(dead.endpoint, h.start, h.end) if h.start == 2 else h for h in chain]
            planned.append(chain)
            return chain

        model.blocks.plan = plan_dead_first
        out = model(inputs_embeds=embeds, labels=ids)
        # the server that ran the forward pass dies before the backward pass: it is recomputed elsewhere
        third = fork_serve(str(model_dir), "--blocks", "2:4", *FAST, "--initial-peers", first.endpoint)
        assert model.blocks.discovery.wait(
            lambda _: third.endpoint in {r.addresses[0] for r in model.blocks.servers()}, 15)
        alive.stop(signal.SIGKILL)
        out.loss.backward()
        assert model.blocks.failures(dead.endpoint) >= 1 and len(planned) >= 2
    ref_embeds = ref.get_input_embeddings()(ids).detach().requires_grad_(True)
    ref_out = ref(inputs_embeds=ref_embeds, labels=ids)
    ref_out.loss.backward()
    torch.testing.assert_close(out.logits, ref_out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embeds.grad, ref_embeds.grad, atol=1e-6, rtol=1e-4)


# --- a server whose real span differs from its record ------------------------------------------------------------

LIAR_ID = "0123456789abcdef"


def lie_about(model, first, liar, start, end):
    """Gossip (through `first`) a record of `liar`'s address that claims blocks [start, end) and is fast and roomy
    enough to be planned before every honest server; wait until the client knows it."""
    template = next(r for r in model.blocks.discovery.records() if r.addresses[0] == first.endpoint)
    lying = dataclasses.replace(template, peer_id=LIAR_ID, start=start, end=end, addresses=(liar.endpoint,),
                                throughput=1e12, cache_tokens_free=1 << 30, cache_tokens_total=1 << 30, seq=1,
                                ttl=600.0, updated_at=time.time())
    with RpcClient(first.endpoint) as client:
        client.call("gossip", {"records": [record_to_wire(lying)]})
    assert model.blocks.discovery.wait(
        lambda _: any(r.peer_id == LIAR_ID for r in model.blocks.servers()), 15)


@pytest.mark.slow
def test_generation_routes_around_a_server_that_does_not_hold_its_announced_blocks(model_dir, fork_serve):
    ref = load_reference(model_dir)
    first = fork_serve(str(model_dir), "--blocks", "0:1", *FAST)
    honest = [first, *start_all(fork_serve, model_dir, [(1, 2), (2, 4)], [first.endpoint])]
    liar = fork_serve(str(model_dir), "--blocks", "0:2", *FAST)  # knows no one: only the lie speaks of it
    model = connect(model_dir, first, 3)
    expected = ref.generate(PROMPT, max_new_tokens=8, do_sample=False)
    with model:
        lie_about(model, first, liar, 0, 4)
        for _ in range(3):  # measured round trips: one hop to the liar beats three honest ones
            model.blocks.ping_all()
        assert model.blocks.plan(cache_needed=32) == [Hop(liar.endpoint, 0, 4)]  # the lie looks best
        with model.inference_session(max_length=32) as session:
            got = model.generate(PROMPT, max_new_tokens=8, do_sample=False)
            assert [hop.peer for hop in session.route] == [s.endpoint for s in honest]
        assert model.blocks.failures(liar.endpoint) >= 1  # the liar was asked, answered wrong_blocks, was banned
    assert got.tolist() == expected.tolist()


@pytest.mark.slow
def test_forward_and_backward_route_around_a_server_that_does_not_hold_its_announced_blocks(model_dir, fork_serve):
    ref = load_reference(model_dir)
    first = fork_serve(str(model_dir), "--blocks", "0:2", *FAST)
    others = start_all(fork_serve, model_dir, [(2, 4), (2, 4)], [first.endpoint])
    liar = fork_serve(str(model_dir), "--blocks", "0:2", *FAST)
    # bans short enough that the liar is planned again by the time the backward pass recomputes blocks 2:4
    model = connect(model_dir, first, 3, ban_time=0.2, max_ban_time=0.4)
    with model:
        lie_about(model, first, liar, 0, 4)
        real_plan, planned, backward = model.blocks.plan, [], []

        def usable(endpoint):
            return any(r.addresses[0] == endpoint for r in model.blocks.servers())

        def plan(start=0, end=None, kind="inference", cache_needed=0, adapter=None):
            if backward:  # the recomputation: once the liar's ban is over and the client counts it again (bounded)
                deadline = time.monotonic() + 5
                while not usable(liar.endpoint) and time.monotonic() < deadline:
                    time.sleep(0.01)
            chain = real_plan(start, end, kind, cache_needed, adapter)
            planned.append(chain)
            return chain

        model.blocks.plan = plan
        embeds = model.get_input_embeddings()(PROMPT).detach().requires_grad_(True)
        out = model(inputs_embeds=embeds, labels=PROMPT)
        assert planned[0][0] == Hop(liar.endpoint, 0, 4) and model.blocks.failures(liar.endpoint) >= 1
        # the server of blocks 2:4 that ran the forward pass dies: the backward pass recomputes them, planning the
        # liar first again (its ban is over), and goes on with the other honest server
        used = planned[-1][-1].peer
        next(s for s in others if s.endpoint == used).stop(signal.SIGKILL)
        forwards = len(planned)
        backward.append(True)
        out.loss.backward()
        assert planned[forwards][0] == Hop(liar.endpoint, 2, 4)  # the recomputation asked the liar first
        assert model.blocks.failures(liar.endpoint) >= 1
    ref_embeds = ref.get_input_embeddings()(PROMPT).detach().requires_grad_(True)
    ref_out = ref(inputs_embeds=ref_embeds, labels=PROMPT)
    ref_out.loss.backward()
    torch.testing.assert_close(out.logits, ref_out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embeds.grad, ref_embeds.grad, atol=1e-6, rtol=1e-4)
