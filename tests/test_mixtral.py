"""Mixtral (a sparse mixture of experts in every block) served by the swarm, against plain transformers on the same
weights (float32): greedy tokens through 2 and 3 servers, in and out of sessions, with left padding; logits and
gradients; requests of several clients packed in one pass; recovery after a killed server; prompt tuning; LoRA and
(IA)^3 on the attention projections against PEFT, and LoRA on the experts or the router refused; both checkpoint
layouts (the hub's per-expert matrices, transformers' fused ones); the family found by model_type; `swarm serve`
choosing its blocks by a block's memory (the experts' included) and `swarm status` showing the swarm.

The tiny Mixtral has 4 blocks of 4 experts (top-2), hidden size 64, a sliding window of 8 tokens (shorter than the
prompts plus what is generated), and a router with large weights, so that tokens are sent to different experts."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import peft
import pytest
import torch
from conftest import client, load_reference
from safetensors import safe_open
from safetensors.torch import save_file
from test_batching import WORK, _expected, _generate_together
from test_lora import peft_twin
from test_lora import randomize as randomize_lora
from test_ptune import leaf, local_hidden
from test_ptune import randomize as randomize_prompts
from test_recovery import FAST, KillDuring, connect, start_all

from swarm.cli.app import run
from swarm.core.adapters import check_peft, read_peft
from swarm.core.client.config import ClientConfig
from swarm.core.models import family_for, supported_architectures
from swarm.core.models.mixtral import MixtralFamily
from swarm.core.server import Server, ServerConfig
from swarm.core.server.adapters import AdapterConfig
from swarm.core.server.backend import BlockSpan, Work
from swarm.core.server.placement import RESERVE_BYTES, block_cost
from swarm.core.server.throughput import measure
from swarm.core.weights import ModelSource
from swarm.transport.errors import ConfigError
from swarm.transport.rpc import RpcClient

WINDOW = 8
PROMPTS = [[5, 17, 99, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
ATTENTION = ["k_proj", "o_proj", "q_proj", "v_proj"]


def make_tiny_mixtral(path: Path, layers: int = 4, seed: int = 0, fused: bool = False, **overrides) -> Path:
    """Save a tiny random Mixtral to `path`: in the hub's layout (per-expert w1/w2/w3, what `save_pretrained` writes
    by default) or, `fused`, in transformers' own (`save_original_format=False`)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                  max_position_embeddings=512, sliding_window=WINDOW, tie_word_embeddings=False)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**kwargs)).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # a decisive router: tokens of a pass go to different experts
            layer.mlp.gate.weight.normal_(0.0, 0.5)
    model.save_pretrained(path, save_original_format=not fused)
    return path


def start_servers(path: Path, spans) -> list[Server]:
    return [Server(ServerConfig(str(path), span, host="127.0.0.1", poll_ms=20)).start() for span in spans]


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    return make_tiny_mixtral(tmp_path_factory.mktemp("mixtral") / "mixtral")


@pytest.fixture(scope="module")
def mixtral_ref(mixtral):
    return load_reference(mixtral)


@pytest.fixture(scope="module")
def swarms(mixtral):
    """Two swarms of the same checkpoint: 2 servers (0:2, 2:4) and 3 servers (0:1, 1:3, 3:4)."""
    two, three = start_servers(mixtral, ((0, 2), (2, 4))), start_servers(mixtral, ((0, 1), (1, 3), (3, 4)))
    try:
        yield {"two": [s.endpoint for s in two], "three": [s.endpoint for s in three]}
    finally:
        for server in (*two, *three):
            server.stop()


# --- the family ----------------------------------------------------------------------------------------------------


def test_family_by_architecture_and_by_model_type(mixtral):
    config = ModelSource(str(mixtral)).config()
    assert "MixtralForCausalLM" in supported_architectures()
    assert isinstance(family_for(config), MixtralFamily)
    config.architectures = None  # as a config converted from GGUF: the family comes from model_type
    assert isinstance(family_for(config), MixtralFamily)
    config.model_type = "no-such-model"
    with pytest.raises(ConfigError, match="model_type 'no-such-model'.*MixtralForCausalLM"):
        family_for(config)


def test_window_linears_and_block_cost_count_the_experts(mixtral):
    from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer

    family, config = MixtralFamily(), ModelSource(str(mixtral)).config()
    assert [family.attention_window(config, i) for i in range(4)] == [WINDOW] * 4
    config.sliding_window = None
    assert family.attention_window(config, 0) is None
    # adapters hook linear layers: the attention projections; the router and the experts are parameters
    assert sorted(m.rsplit(".", 1)[-1] for m in BlockSpan.load(ModelSource(str(mixtral)), 0, 1,
                                                               torch.float32).linears(0)) == ATTENTION
    # placement's cost of a block is all of its weights, the experts' first of all
    layer = MixtralDecoderLayer(config, 0)
    experts = sum(p.numel() for p in layer.mlp.experts.parameters())
    cost = block_cost(family, config, torch.float32)
    assert cost.weights == 4 * sum(p.numel() for p in layer.parameters()) and 4 * experts > cost.weights / 2
    assert cost.cache_per_token == 2 * 2 * 16 * 4  # keys and values of 2 heads of 16, float32
    # the throughput measurement builds one block of random weights and runs it
    measured = measure(family, config, torch.float32, forward_tokens=16, repeats=1, steps=2)
    assert measured.forward_tps > 0 and measured.inference_sps > 0


# --- checkpoints ---------------------------------------------------------------------------------------------------


def test_both_checkpoint_layouts_give_the_blocks_transformers_loads(mixtral, mixtral_ref, tmp_path):
    fused = make_tiny_mixtral(tmp_path / "fused", fused=True)
    with safe_open(str(mixtral / "model.safetensors"), "pt") as f:
        hub_keys = set(f.keys())
    with safe_open(str(fused / "model.safetensors"), "pt") as f:
        fused_keys = set(f.keys())
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in hub_keys
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused_keys and not fused_keys & {
        k for k in hub_keys if "block_sparse_moe" in k}
    expected = {k: v for k, v in mixtral_ref.state_dict().items() if k.startswith("model.layers.")}
    for path in (mixtral, fused):
        span = BlockSpan.load(ModelSource(str(path)), 1, 4, torch.float32)
        got = {f"model.layers.{1 + int(k.split('.', 1)[0])}.{k.split('.', 1)[1]}": v
               for k, v in span.blocks.state_dict().items()}
        assert got.keys() == {k for k in expected if not k.startswith("model.layers.0.")}
        for key, value in got.items():
            assert torch.equal(value, expected[key]), key


def test_hub_tensors_are_let_go_block_by_block(mixtral, monkeypatch):
    """While block i is converted, the per-expert tensors of the blocks before it are gone: the fused copies and the
    hub's matrices exist side by side for one block at most."""
    import weakref

    from swarm.core.models import mixtral as module

    real, seen = module.fuse_experts, []

    def fuse(tensors, *args):
        for earlier in seen:
            assert all(ref() is None for ref in earlier)
        seen.append([weakref.ref(t) for k, t in tensors.items() if module.EXPERT_KEY.fullmatch(k)])
        return real(tensors, *args)

    monkeypatch.setattr(module, "fuse_experts", fuse)
    span = BlockSpan.load(ModelSource(str(mixtral)), 0, 4, torch.float32)
    assert [len(refs) for refs in seen] == [4 * 3] * 4  # 4 experts' w1, w2, w3 per block
    assert all(ref() is None for refs in seen for ref in refs)
    # the experts run with transformers' grouped_mm; the span's own config is left as it was read
    assert {block.mlp.experts.config._experts_implementation for block in span.blocks} == {"grouped_mm"}
    assert span.config._experts_implementation is None


def test_a_checkpoint_that_does_not_fit_its_config_is_refused(mixtral, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(str(mixtral / "model.safetensors"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((mixtral / "config.json").read_text())
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.block_sparse_moe.experts.2.w3.weight"},
              str(broken / "model.safetensors"))
    BlockSpan.load(ModelSource(str(broken)), 0, 1, torch.float32)  # block 0 is whole
    with pytest.raises(ConfigError, match=r"lacks tensors of block 1: block_sparse_moe\.experts\.2\.w3\.weight"):
        BlockSpan.load(ModelSource(str(broken)), 0, 2, torch.float32)
    config = json.loads((mixtral / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "num_local_experts": 3}))
    with pytest.raises(ConfigError, match="has expert 3, but the config has 3 experts"):
        BlockSpan.load(ModelSource(str(broken)), 0, 1, torch.float32)
    (broken / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    with pytest.raises(ConfigError, match=r"w1\.weight of block 0 is \[96, 64\], but the config says \[80, 64\]"):
        BlockSpan.load(ModelSource(str(broken)), 0, 1, torch.float32)


# --- generation, logits, gradients -----------------------------------------------------------------------------------


@pytest.mark.parametrize("servers", ["two", "three"])
@pytest.mark.parametrize("prompt", PROMPTS, ids=["short", "longer-than-the-window"])
def test_greedy_tokens_equal_transformers(mixtral, mixtral_ref, swarms, servers, prompt):
    model = client(mixtral, swarms[servers])
    ids = torch.tensor([prompt])
    expected = mixtral_ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert len(set(expected[0, len(prompt):].tolist())) > 2  # not one token over and over
    assert model.generate(ids, max_new_tokens=12, do_sample=False).tolist() == expected.tolist()
    with model.inference_session(max_length=64):
        assert model.generate(ids, max_new_tokens=12, do_sample=False).tolist() == expected.tolist()


@pytest.mark.parametrize("servers", ["two", "three"])
def test_left_padded_rows_of_different_lengths(mixtral, mixtral_ref, swarms, servers):
    model = client(mixtral, swarms[servers])
    ids = torch.tensor([[0, 0, 0, 0, 5, 17, 99], [1, 2, 3, 4, 5, 6, 7], [0, 0, 42, 9, 8, 7, 6]])
    mask = (torch.arange(7) >= torch.tensor([[4], [0], [2]])).long()
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    expected = mixtral_ref.generate(ids, **kwargs)
    assert model.generate(ids, **kwargs).tolist() == expected.tolist()
    with model.inference_session(max_length=32):
        assert model.generate(ids, **kwargs).tolist() == expected.tolist()
    alone = mixtral_ref.generate(ids[:1, 4:], max_new_tokens=10, do_sample=False)  # padding changes nothing
    assert expected[0, 4:].tolist() == alone[0].tolist()
    with torch.no_grad():
        got, want = model(ids, attention_mask=mask).logits, mixtral_ref(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=1e-5)


def test_input_gradients_equal_transformers(mixtral, mixtral_ref, swarms):
    model = client(mixtral, swarms["three"])
    ids = torch.tensor([[3, 9, 27, 81, 1, 2, 5, 7, 11, 13, 17, 19]])
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    loss = model(inputs_embeds=embeds, labels=ids).loss
    loss.backward()
    ref_embeds = mixtral_ref.get_input_embeddings()(ids).detach().requires_grad_(True)
    ref_loss = mixtral_ref(inputs_embeds=ref_embeds, labels=ids).loss
    ref_loss.backward()
    mixtral_ref.zero_grad(set_to_none=True)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embeds.grad, ref_embeds.grad, atol=1e-6, rtol=1e-4)


# --- packing ---------------------------------------------------------------------------------------------------------


def test_requests_packed_in_one_pass_get_what_they_get_alone(mixtral, mixtral_ref):
    """A padded forward of 2 rows and a session's step share one pass: every token is routed alone, so each request
    gets what it gets alone and what transformers computes."""
    span = BlockSpan.load(ModelSource(str(mixtral)), 0, 4, torch.float32)
    embed = mixtral_ref.model.embed_tokens
    ids = torch.tensor([[0, 0, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    history = torch.tensor([[20, 21, 22, 23, 24, 25, 26, 27, 28, 29]])
    with torch.inference_mode():
        forward_alone = span.run([Work(embed(ids), mask)])[0]
        session = span.new_cache(1, 16)
        span.run([Work(embed(history[:, :7]), None, session)])
        step_alone = span.run([Work(embed(history[:, 7:]), None, session)])[0]
        session = span.new_cache(1, 16)
        span.run([Work(embed(history[:, :7]), None, session)])
        forward, step = span.run([Work(embed(ids), mask), Work(embed(history[:, 7:]), None, session)])
        norm = mixtral_ref.model.norm
        want_forward = mixtral_ref.model(ids, attention_mask=mask).last_hidden_state
        want_step = mixtral_ref.model(history).last_hidden_state[:, 7:]
    real = mask.bool()
    torch.testing.assert_close(forward[real], forward_alone[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step, step_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norm(forward)[real], want_forward[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norm(step), want_step, atol=1e-5, rtol=1e-5)


def test_clients_generating_together_share_passes_and_get_their_own_tokens(mixtral, mixtral_ref, swarms):
    work = WORK[:4]
    results = _generate_together(mixtral, swarms["two"], work, [ClientConfig()] * len(work))
    assert results == _expected(mixtral_ref, work)
    with RpcClient(swarms["two"][1]) as rpc:
        assert rpc.call("info").fields["batch"]["peak_sessions"] >= 2  # steps of different clients shared passes


# --- prompt tuning and LoRA ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_prompt_tuning_gradients_equal_transformers(mixtral, mixtral_ref, swarms, mode):
    ids = torch.tensor([[5, 9, 17, 3, 44, 2, 8, 1, 6], [7, 1, 8, 0, 0, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    labels = ids.masked_fill(mask == 0, -100)
    torch.manual_seed(1)
    with client(mixtral, swarms["two"], tuning_mode=mode, pre_seq_len=4) as model:
        randomize_prompts(model)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        prompts = leaf(model.tuning.prompts)
        deep = leaf(model.tuning.deep_prompts) if mode == "deep_ptune" else None
        hidden, _ = local_hidden(mixtral_ref, ids, mask, prompts, deep)
        logits = mixtral_ref.lm_head(hidden[:, 4:])
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        mixtral_ref.zero_grad(set_to_none=True)
        torch.testing.assert_close(out.logits[mask.bool()], logits[mask.bool()], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(model.tuning.prompts.grad, prompts.grad, rtol=1e-4, atol=1e-6)
        if deep is not None:
            assert deep.grad.abs().sum() > 0
            torch.testing.assert_close(model.tuning.deep_prompts.grad, deep.grad, rtol=1e-4, atol=1e-6)


def test_client_lora_on_the_attention_projections_equals_peft(mixtral, swarms):
    ids = torch.tensor([[5, 60, 61, 62, 63, 64, 65, 66, 67, 68], [5, 70, 71, 72, 73, 74, 0, 0, 0, 0]])
    mask = (torch.arange(10) < torch.tensor([[10], [6]])).long()
    labels = ids.masked_fill(mask == 0, -100)
    with client(mixtral, swarms["three"], tuning_mode="lora", lora_rank=4, lora_alpha=8,
                lora_targets=["all-linear"]) as model:
        assert sorted(m.rsplit(".", 1)[-1] for m in model.tuning.targets) == ATTENTION
        randomize_lora(model)
        twin = peft_twin(mixtral, model)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        expected = twin(input_ids=ids, attention_mask=mask, labels=labels)
        expected.loss.backward()
        torch.testing.assert_close(out.logits[mask.bool()], expected.logits[mask.bool()], atol=1e-4, rtol=1e-4)
        params = dict(twin.named_parameters())
        for module in model.tuning.targets:
            for part, stacks in (("A", model.tuning.a), ("B", model.tuning.b)):
                for block in range(4):
                    want = params[f"base_model.model.model.layers.{block}.{module}.lora_{part}.default.weight"].grad
                    torch.testing.assert_close(stacks[module.replace(".", "__")].grad[block], want, atol=1e-5,
                                               rtol=1e-4)
    for target in (["w1"], ["gate"], ["gate_up_proj"]):
        with pytest.raises(ConfigError, match="not a linear layer of this model's blocks; choose from "
                                              "k_proj, o_proj, q_proj, v_proj"):
            client(mixtral, swarms["two"], tuning_mode="lora", lora_targets=target)


def make_peft_adapter(path: Path, directory: Path, config: peft.PeftConfig, seed: int) -> peft.PeftModel:
    """A PEFT adapter made by PEFT on the transformers model, every adapter tensor random (LoRA: non-zero; (IA)^3:
    around 1)."""
    model = peft.get_peft_model(load_reference(path), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
            elif "ia3_l" in name:
                param.copy_(1 + 0.5 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(directory)
    return model.eval()


def test_served_adapters_equal_peft_and_expert_loras_are_refused(mixtral, tmp_path):
    """PEFT adapters of the attention projections (LoRA, (IA)^3) are served and give PEFT's tokens; a LoRA of the
    experts or of the router (PEFT's target_parameters, or per-expert tensors of the hub's layout) is refused when
    it is checked, naming the layers swarm adapts, and a server never starts with one."""
    twins = {"attn-lora": make_peft_adapter(mixtral, tmp_path / "attn-lora", peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0), seed=1),
        "attn-ia3": make_peft_adapter(mixtral, tmp_path / "attn-ia3", peft.IA3Config(
            target_modules=["k_proj", "v_proj", "o_proj"], feedforward_modules=["o_proj"]), seed=4)}
    make_peft_adapter(mixtral, tmp_path / "expert-lora", peft.LoraConfig(
        r=2, target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        lora_dropout=0.0), seed=2)
    make_peft_adapter(mixtral, tmp_path / "router-lora", peft.LoraConfig(
        r=2, target_modules=[], target_parameters=["mlp.gate.weight"], lora_dropout=0.0), seed=3)
    # a LoRA trained on transformers 4, whose experts were linear layers (block_sparse_moe.experts.E.w1)
    old = tmp_path / "old-expert-lora"
    old.mkdir()
    (old / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                         "target_modules": ["w1", "w2", "w3"]}))
    save_file({f"base_model.model.model.layers.{n}.block_sparse_moe.experts.{e}.{w}.lora_{p}.weight":
               torch.zeros((2, 64) if p == "A" else (96 if w != "w2" else 64, 2))
               for n in range(4) for e in range(4) for w in ("w1", "w2", "w3") for p in "AB"},
              str(old / "adapter_model.safetensors"))

    served = [Server(ServerConfig(str(mixtral), span, host="127.0.0.1", poll_ms=20,
                                  adapters=AdapterConfig(preload=tuple(str(tmp_path / n) for n in twins))))
              for span in ((0, 2), (2, 4))]
    try:
        endpoints = [server.start().endpoint for server in served]
        ids = torch.tensor([[5, 9, 17, 3, 44, 2, 8, 1, 6, 60]])
        model = client(mixtral, endpoints)
        plain = model.generate(ids, max_new_tokens=8, do_sample=False).tolist()
        for name, twin in twins.items():
            with torch.no_grad():
                want = twin.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
            got = model.generate(ids, max_new_tokens=8, do_sample=False, adapter=name)
            assert got.tolist() == want.tolist() and got.tolist() != plain, name
        span = served[0].span
    finally:
        for server in served:
            server.stop()

    supported = r"linear layers \(k_proj, o_proj, q_proj, v_proj\)"
    for name, targets in (("expert-lora", ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]),
                          ("router-lora", ["mlp.gate.weight"])):
        with pytest.raises(ConfigError, match=rf"adapter {name} adapts parameters that are not linear layers "
                                              rf"\(target_parameters: .*{supported}") as refused:
            read_peft(str(tmp_path / name), span.family, span.config, 0, 2, span.linears, span.dtype)
        assert all(target in str(refused.value) for target in targets)
        bad = Server(ServerConfig(str(mixtral), (0, 2), host="127.0.0.1",
                                  adapters=AdapterConfig(preload=(str(tmp_path / name),))))
        with pytest.raises(ConfigError, match=supported):
            bad.start()
        bad.stop()
    check_peft(str(old))  # its options are fine: its tensors are not
    with pytest.raises(ConfigError, match=r"targets 'block_sparse_moe\.experts\.0\.w1' .* which is not a linear "
                                          r"layer of block 0; swarm applies adapters to the blocks' linear layers: "
                                          r"self_attn\.k_proj, self_attn\.o_proj"):
        read_peft(str(old), span.family, span.config, 0, 2, span.linears, span.dtype)


# --- servers as processes: recovery, the CLI ------------------------------------------------------------------------


@pytest.mark.slow
def test_generation_survives_a_killed_server(tmp_path, fork_serve):
    path = make_tiny_mixtral(tmp_path / f"mixtral-ft-{tmp_path.name[-10:]}", seed=21)
    ref = load_reference(path)
    first = fork_serve(str(path), "--blocks", "0:2", *FAST)
    others = start_all(fork_serve, path, [(2, 4), (2, 4)], [first.endpoint])
    model = connect(path, first, 3)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 10, 11], [7, 3, 9, 1, 4, 4, 2, 8, 8]])
    mask = torch.tensor([[0, 0] + [1] * 7, [1] * 9])
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    expected = ref.generate(ids, **kwargs)
    with model, model.inference_session(max_length=32) as session:
        killer = KillDuring(session, others, at=[5])
        got = model.generate(ids, **kwargs)
        assert session.recoveries == 1
    assert len(killer.killed) == 1
    assert got.tolist() == expected.tolist()


@pytest.mark.slow
def test_swarm_serve_chooses_blocks_by_their_memory_and_status_shows_them(tmp_path, fork_serve, capsys):
    path = make_tiny_mixtral(tmp_path / f"mixtral-cli-{tmp_path.name[-10:]}", seed=5)
    config = ModelSource(str(path)).config()
    cost = block_cost(MixtralFamily(), config, torch.float32)
    cache_tokens = 64
    one_block = RESERVE_BYTES + cost.weights + cost.per_block(cache_tokens) * 3 // 2  # one block fits, two do not
    first = fork_serve(str(path), "--blocks", "0:3", "--throughput", "200", *FAST)
    second = fork_serve(str(path), "--max-memory", str(one_block), "--cache-tokens", str(cache_tokens),
                        "--throughput", "eval", "--initial-peers", first.endpoint, *FAST)
    model = connect(path, first, 2)
    with model:
        ids = torch.tensor([PROMPTS[1]])
        expected = load_reference(path).generate(ids, max_new_tokens=8, do_sample=False)
        assert model.generate(ids, max_new_tokens=8, do_sample=False).tolist() == expected.tolist()
    assert run(["status", "--initial-peers", first.endpoint, "--no-mdns", "--wait", "1", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    (view,) = status["models"]
    assert view["num_blocks"] == 4 and view["complete"] and view["servers_per_block"] == [1, 1, 1, 1]
    spans = sorted((s["start"], s["end"]) for s in status["servers"])
    assert spans == [(0, 3), (3, 4)]  # the second server measured a block and took the one block missing
    assert all(s["throughput"] > 0 for s in status["servers"])
    assert second.alive() and first.stop(signal.SIGTERM) == 0
