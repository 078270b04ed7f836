"""Checking servers (`ClientConfig.verify`, `--verify`): a server that perturbs its outputs is caught, banned and
routed around while generation and training stay exact; honest servers are never banned; no check without verify."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import fork_swarm, load_reference, swarm_env

from swarm import AutoDistributedModelForCausalLM
from swarm.core.client.config import ClientConfig
from swarm.core.client.verify import relative_difference, tolerance
from swarm.transport.errors import ConfigError
from swarm.transport.messages import Forward

PROMPT = torch.tensor([[7, 3, 9, 1, 4, 4, 2]])


def perturb(server, scale: float = 0.2, seed: int = 0) -> None:
    """Make an in-process server lie: every output of its blocks gets noise of `scale` times its own size added
    (sessions' steps, forwards and the graphs kept for backward all go through `BlockSpan.run`)."""
    real = server.span.run
    generator = torch.Generator().manual_seed(seed)

    def run(works, blocks=None):
        outs = real(works, blocks)
        return [o + scale * o.detach().abs().mean() * torch.randn(o.shape, generator=generator).to(o.dtype)
                for o in outs]

    server.span.run = run


def favour(blocks, endpoint: str) -> None:
    """Routing's snapshot shows the server at `endpoint` as by far the fastest (as a record claiming a huge throughput
    would), so sessions and forwards go through it while it is usable."""
    real = blocks.spans

    def spans(adapter=None):
        return [dataclasses.replace(s, throughput=1e9, rtt=0.0) if s.peer == endpoint else s for s in real(adapter)]

    blocks.spans = spans


class Checker:
    """An rng for the verifier: every computation is drawn for a check, and the checker drawn is `liar` when it can
    be (a lying checker, to see it outvoted)."""

    def __init__(self, liar: str):
        self.liar = liar

    def random(self) -> float:
        return 0.0

    def choice(self, candidates):
        return self.liar if self.liar in candidates else candidates[0]


def connect(path, servers, **config):
    config = ClientConfig(gossip_period=0.2, **config)
    model = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=[s.endpoint for s in servers],
                                                            config=config)
    assert model.blocks.discovery.wait(lambda _: len(model.blocks.servers()) == len(servers), 15)
    return model


def count_forwards(blocks) -> list[int]:
    """Count the forward requests the client sends (checks are forwards) from now on."""
    sent = [0]
    real = blocks.call

    def call(hop, msg_type, fields, tensors, timeout=None, channel=""):
        sent[0] += msg_type == Forward.TYPE
        return real(hop, msg_type, fields, tensors, timeout, channel)

    blocks.call = call
    return sent


@pytest.mark.parametrize("relay", [False, True], ids=["hop-by-hop", "relay"])
def test_a_lying_server_is_caught_in_generation_and_tokens_stay_exact(tiny_llama, tiny_llama_ref, start_server,
                                                                      relay):
    first = start_server(tiny_llama, (0, 3))
    honest = [start_server(tiny_llama, (3, 6)) for _ in range(2)]
    liar = start_server(tiny_llama, (3, 6))
    perturb(liar)
    expected = tiny_llama_ref.generate(PROMPT, max_new_tokens=10, do_sample=False)
    with connect(tiny_llama, [first, *honest, liar], verify=1.0, relay=relay) as model:
        favour(model.blocks, liar.endpoint)
        with model.inference_session(max_length=32) as session:
            got = model.generate(PROMPT, max_new_tokens=10, do_sample=False)
            route = [hop.peer for hop in session.route]
        stats = model.blocks.verifier.stats
        assert model.blocks.distrusted(liar.endpoint) and model.blocks.distrusted(liar.peer_id)
        assert not any(model.blocks.distrusted(s.endpoint) for s in [first, *honest])
        assert liar.endpoint not in route and liar.endpoint not in {s.addresses[0] for s in model.blocks.servers()}
        assert stats.bans == 1 and stats.mismatches == 1 and stats.checks >= 10
        assert stats.skipped >= 10  # blocks 0:3 have a single server: their steps cannot be checked
    assert got.tolist() == expected.tolist()


def test_with_two_servers_the_checked_one_is_banned(tiny_llama, tiny_llama_ref, start_server):
    first = start_server(tiny_llama, (0, 3))
    honest, liar = start_server(tiny_llama, (3, 6)), start_server(tiny_llama, (3, 6))
    perturb(liar)
    ids = torch.tensor([[3, 9, 27, 81, 1, 2], [0, 0, 4, 8, 16, 32]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = tiny_llama_ref.generate(ids, **kwargs)
    with connect(tiny_llama, [first, honest, liar], verify=1.0) as model:
        favour(model.blocks, liar.endpoint)
        got = model.generate(ids, **kwargs)
        assert model.blocks.distrusted(liar.endpoint) and not model.blocks.distrusted(honest.endpoint)
        assert model.blocks.verifier.stats.bans == 1
    assert got.tolist() == expected.tolist()


def test_a_lying_checker_is_outvoted(tiny_llama, tiny_llama_ref, start_server):
    """The honest server runs the session; the liar is drawn as its checker: the third server sides with the honest
    one, so the liar is banned and the honest one keeps serving."""
    first = start_server(tiny_llama, (0, 3))
    honest = [start_server(tiny_llama, (3, 6)) for _ in range(2)]
    liar = start_server(tiny_llama, (3, 6))
    perturb(liar)
    expected = tiny_llama_ref.generate(PROMPT, max_new_tokens=6, do_sample=False)
    with connect(tiny_llama, [first, *honest, liar], verify=1.0) as model:
        favour(model.blocks, honest[0].endpoint)
        model.blocks.verifier._rng = Checker(liar.endpoint)
        with model.inference_session(max_length=32) as session:
            got = model.generate(PROMPT, max_new_tokens=6, do_sample=False)
            assert session.route[-1].peer == honest[0].endpoint and session.recoveries == 0
        assert model.blocks.distrusted(liar.endpoint)
        assert not any(model.blocks.distrusted(s.endpoint) for s in [first, *honest])
    assert got.tolist() == expected.tolist()


def test_a_lying_server_is_caught_in_training(tiny_llama, start_server):
    servers = [start_server(tiny_llama, (0, 3)), start_server(tiny_llama, (0, 3)), start_server(tiny_llama, (3, 6)),
               start_server(tiny_llama, (3, 6)), start_server(tiny_llama, (3, 6))]
    liar = servers[-1]
    perturb(liar)
    ids = torch.tensor([[3, 9, 27, 81, 1, 2, 5, 7], [11, 5, 4, 8, 16, 32, 64, 1]])
    mask = torch.ones_like(ids)
    labels = ids
    with connect(tiny_llama, servers, verify=1.0) as model:
        favour(model.blocks, liar.endpoint)
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        assert model.blocks.distrusted(liar.endpoint) and model.blocks.verifier.stats.bans == 1
        assert not any(model.blocks.distrusted(s.endpoint) for s in servers[:-1])
        ref = load_reference(tiny_llama)  # its own copy: the shared one's gradients stay untouched
        ref_loss = ref(ids, attention_mask=mask, labels=labels).loss
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.embed_tokens.weight.grad, ref.model.embed_tokens.weight.grad,
                                   atol=1e-6, rtol=1e-4)
        # the next step does not touch the liar at all
        sent = count_forwards(model.blocks)
        real_call = model.blocks.call
        peers_used: set[str] = set()
        model.blocks.call = lambda hop, *a, **k: (peers_used.add(hop.peer), real_call(hop, *a, **k))[1]
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        assert sent[0] >= 2 and liar.endpoint not in peers_used


def test_honest_servers_are_never_banned(tiny_llama, tiny_llama_ref, start_server):
    servers = [start_server(tiny_llama, span) for span in ((0, 3), (0, 3), (3, 6), (3, 6), (0, 6))]  # 0:6 checks parts
    ids = torch.tensor([[3, 9, 27, 81, 1, 2], [0, 0, 4, 8, 16, 32]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with connect(tiny_llama, servers, verify=1.0) as model:
        favour(model.blocks, servers[0].endpoint)  # sessions go 0:3 -> 3:6, so both hops have a second server
        for relay in (False, True):
            model.blocks.config = dataclasses.replace(model.blocks.config, relay=relay)
            assert model.generate(ids, **kwargs).tolist() == tiny_llama_ref.generate(ids, **kwargs).tolist()
        for _ in range(3):
            model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        stats = model.blocks.verifier.stats
        assert stats.checks >= 2 * 12 and stats.mismatches == 0 and stats.bans == 0 and stats.failed == 0
        assert not any(model.blocks.distrusted(s.endpoint) for s in servers)


def test_verify_zero_sends_no_checks(tiny_llama, tiny_llama_ref, start_server):
    servers = [start_server(tiny_llama, span) for span in ((0, 3), (3, 6), (3, 6))]
    perturb(servers[2])  # not checked: nothing can catch it (routed elsewhere, so the tokens stay right)
    with connect(tiny_llama, servers) as model:
        favour(model.blocks, servers[1].endpoint)
        sent = count_forwards(model.blocks)
        got = model.generate(PROMPT, max_new_tokens=8, do_sample=False)
        assert sent[0] == 0 and model.blocks.verifier.stats.checks == 0 and model.blocks.verifier.stats.skipped == 0
        assert not model.blocks.distrusted(servers[2].endpoint)
    assert got.tolist() == tiny_llama_ref.generate(PROMPT, max_new_tokens=8, do_sample=False).tolist()


@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan, math.inf, True, "0.1"])
def test_bad_verify_values_are_refused(value):
    with pytest.raises(ConfigError, match="verify must be a fraction in \\[0, 1\\]"):
        ClientConfig(verify=value)


@pytest.mark.parametrize("command", ["chat", "tune"])
@pytest.mark.parametrize("value", ["-0.5", "2", "nan"])
def test_bad_verify_on_the_command_line(tiny_llama, tmp_path, command, value):
    extra = ["--prompt", "hi"] if command == "chat" else ["--dataset", str(tmp_path / "none.jsonl")]
    result = fork_swarm(command, str(tiny_llama), "--initial-peers", "tcp://127.0.0.1:1", "--verify", value, *extra,
                        env=swarm_env(tmp_path))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: --verify must be a fraction in [0, 1]")


def test_tolerances_follow_dtypes_and_quantization():
    assert tolerance(["float32", "float32"], ["none", "none"]) == 1e-3
    assert tolerance(["float32", "bfloat16"], ["none", "none"]) == 5e-2
    assert tolerance(["float16"], ["none"]) == 2e-2
    assert tolerance(["float16"], ["int8", "int8"]) == 0.1
    assert tolerance(["bfloat16"], ["nf4", "nf4"]) == 0.2
    assert tolerance(["bfloat16"], ["nf4", "none"]) == 0.25  # two quantizations compute different functions
    assert tolerance(["float8"], ["weird"]) == 0.2  # unknown: loose
    a = torch.randn(2, 3, 8)
    assert relative_difference(a, a) == 0.0
    assert relative_difference(a, a * 1.01) == pytest.approx(0.01 / 1.01, rel=1e-4)
    b = a.clone()
    b[1, 0] = 100.0  # a padded position: not compared
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    assert relative_difference(a, b, mask) == 0.0 and relative_difference(a, b) > 0.5
    assert relative_difference(a, a * math.nan) == math.inf
