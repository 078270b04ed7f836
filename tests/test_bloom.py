"""The BLOOM family through the swarm against plain transformers on the same weights: greedy tokens through 2 and 3
servers, in and out of sessions, with left padding; logits; prompt tuning and LoRA gradients; adapters the servers
serve; packed passes of several requests; both checkpoint layouts; the model_type lookup; recovery after a killed
server (servers started through the CLI)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import peft
import pytest
import torch
from conftest import client
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from swarm.core.adapters import model_linears
from swarm.core.models import family_for
from swarm.core.models.bloom import BloomFamily, alibi_slopes
from swarm.core.server import Server, ServerConfig
from swarm.core.server.adapters import AdapterConfig
from swarm.core.server.backend import BlockSpan, Work
from swarm.core.server.placement import block_cost
from swarm.core.weights import ModelSource

# rows of different lengths, padded on the left (pad id 0)
IDS = torch.tensor([[0, 0, 0, 5, 17, 99, 3], [1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 0, 0, 42, 8]])
MASK = (torch.arange(7)[None] >= torch.tensor([[3], [0], [5]])).long()
GREEDY = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)


def make_tiny_bloom(path: Path, layers: int = 6, seed: int = 0, base_layout: bool = False, **overrides) -> Path:
    """Save a tiny random BloomForCausalLM (6 heads: ALiBi slopes of a head count that is not a power of two).
    `base_layout` saves it as the hub's BLOOM checkpoints are: the base model's tensors, without `transformer.`."""
    from transformers import BloomConfig, BloomForCausalLM

    kwargs = dict(vocab_size=128, hidden_size=48, n_layer=layers, n_head=6, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, initializer_range=0.3)  # weights large enough for varied greedy tokens
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = BloomForCausalLM(BloomConfig(**kwargs)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that forgetting one shows
        for name, param in model.named_parameters():
            if "layernorm" in name or "ln_f" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    if base_layout:
        model.transformer.save_pretrained(path)
        config = json.loads((path / "config.json").read_text())
        config["architectures"] = ["BloomForCausalLM"]  # as the hub's configs say, with their older field names
        config["n_embed"], config["num_attention_heads"] = config.pop("hidden_size"), config.pop("n_head")
        (path / "config.json").write_text(json.dumps(config))
    else:
        model.save_pretrained(path)
    return path


def reference(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_bloom(tmp_path_factory) -> Path:
    return make_tiny_bloom(tmp_path_factory.mktemp("bloom") / "bloom")


@pytest.fixture(scope="module")
def bloom_ref(tiny_bloom):
    return reference(tiny_bloom)


@pytest.fixture(scope="module")
def bloom_swarms(tiny_bloom):
    """Two swarms of the same model (their servers know nothing of each other): 2 servers (0:3, 3:6) and 3 servers
    (0:2, 2:4, 4:6)."""
    servers: list[Server] = []
    try:
        for span in ((0, 3), (3, 6), (0, 2), (2, 4), (4, 6)):
            servers.append(Server(ServerConfig(str(tiny_bloom), span, host="127.0.0.1", throughput=100.0)).start())
        yield {"two": [s.endpoint for s in servers[:2]], "three": [s.endpoint for s in servers[2:]],
               "servers": servers}
    finally:
        for server in servers:
            server.stop()


def greedy_by_forward(model, ids, mask, new):
    """Greedy decoding by forward passes over the whole sequences (no session, no cache anywhere)."""
    for _ in range(new):
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids


# --- the family on its own ------------------------------------------------------------------------------------------


def test_family_found_by_architecture_and_by_model_type(tiny_bloom):
    from transformers import BloomConfig

    config = BloomConfig(n_layer=2)
    config.architectures = None  # as a config converted from GGUF
    assert isinstance(family_for(config), BloomFamily)
    config.architectures = ["BloomForCausalLM"]
    assert isinstance(family_for(config), BloomFamily)
    source = ModelSource(str(tiny_bloom))
    assert isinstance(source.family(), BloomFamily)


def test_alibi_slopes_are_blooms():
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    mask = torch.ones(1, 5, dtype=torch.long)
    for heads in (1, 4, 6, 12, 16, 112):  # bloom-176b has 112 heads
        expected = build_alibi_tensor(mask, heads, torch.float32).view(heads, 5)[:, -1] / 4
        assert torch.equal(alibi_slopes(heads), expected)


def test_block_cost_linears_and_throughput_measure(tiny_bloom):
    from swarm.core.server.throughput import measure

    source = ModelSource(str(tiny_bloom))
    family, config = source.family(), source.config("float32")
    block = BloomFamily().build_block(config, 0)
    params = sum(p.numel() for p in block.parameters())
    cost = block_cost(family, config, torch.float32)
    assert cost.weights == params * 4
    assert cost.cache_per_token == 2 * 48 * 4  # keys and values of 6 heads of 8
    assert model_linears(family, config, 3) == {"self_attention.query_key_value": (48, 144),
                                                "self_attention.dense": (48, 48), "mlp.dense_h_to_4h": (48, 192),
                                                "mlp.dense_4h_to_h": (192, 48)}
    found = measure(family, config, torch.float32, forward_tokens=16, repeats=1, steps=2)
    assert found.forward_tps > 0 and found.inference_sps > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_compute_what_transformers_computes(tiny_bloom, dtype):
    """The span's blocks, between the client's modules, give transformers' logits in float32 and in bfloat16."""
    span = BlockSpan.load(ModelSource(str(tiny_bloom)), 0, 6, dtype)
    ref = AutoModelForCausalLM.from_pretrained(tiny_bloom, dtype=dtype).eval()
    real = MASK.bool()
    with torch.no_grad():
        hidden = ref.transformer.word_embeddings_layernorm(ref.transformer.word_embeddings(IDS))
        ours = ref.lm_head(ref.transformer.ln_f(span.forward(hidden, MASK)))
        theirs = ref(IDS, attention_mask=MASK).logits
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)
    assert span.blocks[0].self_attention.query_key_value.weight.dtype == dtype


def test_packed_passes_equal_each_request_alone(tiny_bloom):
    """Sessions with different cache lengths, rows and left padding, and a forward, in one pass: each gets what it
    gets alone (per-segment ALiBi and masks)."""
    span = BlockSpan.load(ModelSource(str(tiny_bloom)), 0, 6, torch.float32)
    gen = torch.Generator().manual_seed(0)
    plans = [(1, 7, 0), (2, 4, 3), (3, 1, 0)]  # rows, prompt tokens, left padding of row 0
    alone = [span.new_cache(rows, 16) for rows, _, _ in plans]
    packed = [span.new_cache(rows, 16) for rows, _, _ in plans]
    masks = []
    for rows, length, pad in plans:
        mask = torch.ones(rows, length, dtype=torch.long)
        mask[0, :pad] = 0
        masks.append(mask)
    hidden = [torch.randn(rows, length, 48, generator=gen) for rows, length, _ in plans]
    solo = [span.step(h, alone[i], masks[i]) for i, h in enumerate(hidden)]
    with torch.inference_mode():
        together = span.run([Work(h, masks[i], packed[i]) for i, h in enumerate(hidden)])
    for a, b, m in zip(solo, together, masks, strict=True):
        torch.testing.assert_close(b[m.bool()], a[m.bool()], atol=1e-4, rtol=1e-4)
    for step in range(3):
        news = [torch.randn(rows, 2 if step == 1 else 1, 48, generator=gen) for rows, _, _ in plans]
        forward = torch.randn(2, 5, 48, generator=gen)
        solo = [span.step(h, alone[i]) for i, h in enumerate(news)] + [span.forward(forward)]
        with torch.inference_mode():
            together = span.run([Work(h, None, packed[i]) for i, h in enumerate(news)] + [Work(forward)])
        for a, b in zip(solo, together, strict=True):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


# --- through servers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("swarm", ["two", "three"])
def test_greedy_tokens_equal_transformers(tiny_bloom, bloom_ref, bloom_swarms, swarm):
    model = client(tiny_bloom, bloom_swarms[swarm])
    expected = bloom_ref.generate(IDS, attention_mask=MASK, **GREEDY)
    assert model.generate(IDS, attention_mask=MASK, **GREEDY).tolist() == expected.tolist()  # its own session
    with model.inference_session(max_length=32):
        assert model.generate(IDS, attention_mask=MASK, **GREEDY).tolist() == expected.tolist()
    assert greedy_by_forward(model, IDS, MASK, GREEDY["max_new_tokens"]).tolist() == expected.tolist()
    # a padded row generates what it generates alone
    alone = bloom_ref.generate(IDS[:1, 3:], **GREEDY)
    assert expected[0, 3:].tolist() == alone[0].tolist()


def test_session_continues_across_generate_calls(tiny_bloom, bloom_ref, bloom_swarms):
    model = client(tiny_bloom, bloom_swarms["three"])
    ids = IDS[1:2]
    with model.inference_session(max_length=40) as session:
        first = model.generate(ids, max_new_tokens=4, do_sample=False)
        follow_up = torch.cat([first, torch.tensor([[7, 8, 9]])], dim=1)
        second = model.generate(follow_up, max_new_tokens=5, do_sample=False)
        assert session.position == second.shape[1] - 1
    assert second.tolist() == bloom_ref.generate(follow_up, max_new_tokens=5, do_sample=False).tolist()


def test_logits_and_input_gradients_allclose(tiny_bloom, bloom_ref, bloom_swarms):
    model = client(tiny_bloom, bloom_swarms["two"])
    with torch.no_grad():
        got = model(IDS, attention_mask=MASK).logits
        expected = bloom_ref(IDS, attention_mask=MASK).logits
    real = MASK.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    # a hole in the middle of a row: ALiBi counts real tokens only (left padding alone would not show it)
    holed = torch.tensor([[1, 1, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        got = model(IDS[:2], attention_mask=holed).logits
        expected = bloom_ref(IDS[:2], attention_mask=holed).logits
    torch.testing.assert_close(got[holed.bool()], expected[holed.bool()], atol=1e-5, rtol=1e-5)
    # inputs_embeds go through the embeddings' layer norm on the client, as in transformers
    ids = IDS[1:2]
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    loss = model(inputs_embeds=embeds, labels=ids).loss
    loss.backward()
    ref_embeds = bloom_ref.get_input_embeddings()(ids).detach().requires_grad_(True)
    ref_loss = bloom_ref(inputs_embeds=ref_embeds, labels=ids).loss
    ref_loss.backward()
    try:
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(embeds.grad, ref_embeds.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(model.input_norm.weight.grad,
                                   bloom_ref.transformer.word_embeddings_layernorm.weight.grad, atol=1e-6, rtol=1e-4)
    finally:
        bloom_ref.zero_grad(set_to_none=True)


def test_sequence_classifier_equals_transformers(tiny_bloom, bloom_swarms):
    from transformers import BloomForSequenceClassification

    from swarm import AutoDistributedModelForSequenceClassification

    torch.manual_seed(4)
    with AutoDistributedModelForSequenceClassification.from_pretrained(
            str(tiny_bloom), num_labels=3, initial_peers=bloom_swarms["three"]) as model:
        ref = BloomForSequenceClassification.from_pretrained(tiny_bloom, num_labels=3, dtype=torch.float32).eval()
        ref.score.weight.data.copy_(model.score.weight.data)
        ids = IDS[1:2]  # no padding: transformers finds the last token by the pad id, swarm by the mask
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_clients_batched_in_shared_passes_stay_exact(tiny_bloom, bloom_ref, bloom_swarms):
    prompts = [IDS[1:2], IDS[2:3, 5:], IDS[0:1, 3:], torch.tensor([[9, 8, 7, 6, 5, 4, 3, 2, 1]])]
    expected = [bloom_ref.generate(p, max_new_tokens=12, do_sample=False).tolist() for p in prompts]
    models = [client(tiny_bloom, bloom_swarms["two"]) for _ in prompts]
    results: list = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        barrier.wait(30)
        try:
            results[i] = models[i].generate(prompts[i], max_new_tokens=12, do_sample=False).tolist()
        except Exception as e:  # reported below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == expected
    for server in bloom_swarms["servers"][:2]:
        assert server.handler.info()["batch"]["peak_sessions"] >= 2  # steps of different sessions shared passes


# --- prompt tuning, LoRA, adapters ------------------------------------------------------------------------------------


PRE = 3


def local_hidden(ref, ids, mask, prompts, deep):
    """Plain transformers with the prompts in front of the embeddings (inputs_embeds: the embeddings' layer norm
    runs over them too) and, for deep_ptune, each block's prompt added before it."""
    batch = ids.shape[0]
    x = torch.cat([prompts[None].expand(batch, -1, -1), ref.transformer.word_embeddings(ids)], dim=1)
    full = torch.cat([torch.ones(batch, PRE, dtype=mask.dtype), mask], dim=1)
    hooks = []
    if deep is not None:
        for i, block in enumerate(ref.transformer.h):
            def add(module, args, kwargs, i=i):
                hidden = args[0]
                return (torch.cat([hidden[:, :PRE] + deep[i][None], hidden[:, PRE:]], dim=1), *args[1:]), kwargs
            hooks.append(block.register_forward_pre_hook(add, with_kwargs=True))
    try:
        return ref.transformer(inputs_embeds=x, attention_mask=full).last_hidden_state
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_prompt_tuning_gradients_match_transformers(tiny_bloom, bloom_ref, bloom_swarms, mode):
    torch.manual_seed(1)
    model = client(tiny_bloom, bloom_swarms["two"], tuning_mode=mode, pre_seq_len=PRE)
    labels = IDS.masked_fill(MASK == 0, -100)
    with model:
        if model.tuning.deep_prompts is not None:
            with torch.no_grad():
                model.tuning.deep_prompts.normal_(0, 0.1)
        out = model(input_ids=IDS, attention_mask=MASK, labels=labels)
        out.loss.backward()
        prompts = model.tuning.prompts.detach().clone().requires_grad_(True)
        deep = None if mode == "ptune" else model.tuning.deep_prompts.detach().clone().requires_grad_(True)
        try:
            logits = bloom_ref.lm_head(local_hidden(bloom_ref, IDS, MASK, prompts, deep)[:, PRE:])
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100)
            loss.backward()
        finally:
            bloom_ref.zero_grad(set_to_none=True)
        real = MASK.bool()
        torch.testing.assert_close(out.logits[real], logits[real], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=1e-6)
        assert prompts.grad.abs().sum() > 0
        torch.testing.assert_close(model.tuning.prompts.grad, prompts.grad, rtol=1e-4, atol=1e-6)
        if deep is not None:
            assert deep.grad.abs().sum() > 0
            torch.testing.assert_close(model.tuning.deep_prompts.grad, deep.grad, rtol=1e-4, atol=1e-6)


def peft_twin(path: Path, lora):
    """PEFT's LoRA on the local transformers model, with exactly the client's A and B."""
    targets = sorted({m.rsplit(".", 1)[-1] for m in lora.targets})
    twin = peft.get_peft_model(reference(path), peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha,
                                                                target_modules=targets, lora_dropout=0.0))
    params = dict(twin.named_parameters())
    with torch.no_grad():
        for (block, module), (a, b) in lora.per_block().items():
            prefix = f"base_model.model.transformer.h.{block}.{module}"
            params[f"{prefix}.lora_A.default.weight"].copy_(a)
            params[f"{prefix}.lora_B.default.weight"].copy_(b)
    return twin.eval()


def test_client_lora_logits_gradients_and_tokens_equal_peft(tiny_bloom, bloom_swarms):
    targets = ["query_key_value", "dense", "dense_4h_to_h"]
    with client(tiny_bloom, bloom_swarms["three"], tuning_mode="lora", lora_rank=4, lora_alpha=8,
                lora_targets=targets) as model:
        lora = model.tuning
        assert lora.targets == ["mlp.dense_4h_to_h", "self_attention.dense", "self_attention.query_key_value"]
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for param in lora.b.values():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        twin = peft_twin(tiny_bloom, lora)
        labels = IDS.masked_fill(MASK == 0, -100)
        out = model(input_ids=IDS, attention_mask=MASK, labels=labels)
        out.loss.backward()
        expected = twin(input_ids=IDS, attention_mask=MASK, labels=labels)
        expected.loss.backward()
        real = MASK.bool()
        torch.testing.assert_close(out.logits[real], expected.logits[real], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.loss, expected.loss, atol=1e-5, rtol=1e-5)
        params = dict(twin.named_parameters())
        for module in lora.targets:
            for part, stack in (("A", lora.a[module.replace(".", "__")]), ("B", lora.b[module.replace(".", "__")])):
                for block in range(lora.num_blocks):
                    want = params[f"base_model.model.transformer.h.{block}.{module}.lora_{part}.default.weight"].grad
                    torch.testing.assert_close(stack.grad[block], want, atol=1e-5, rtol=1e-4)
        with torch.no_grad():
            want = twin.generate(IDS, attention_mask=MASK, **GREEDY)
        assert model.generate(IDS, attention_mask=MASK, **GREEDY).tolist() == want.tolist()
    with client(tiny_bloom, bloom_swarms["two"], tuning_mode="lora") as model:  # PEFT's default target for BLOOM
        assert model.tuning.targets == ["self_attention.query_key_value"]


def test_served_lora_and_ia3_adapters_equal_peft(tiny_bloom, bloom_ref, tmp_path, start_server):
    configs = {"bloom-lora": peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules="all-linear"),
               "bloom-ia3": peft.IA3Config(task_type="CAUSAL_LM")}  # PEFT's default for BLOOM
    twins = {}
    for name, config in configs.items():
        torch.manual_seed(7)
        twin = peft.get_peft_model(reference(tiny_bloom), config)
        with torch.no_grad():
            for key, param in twin.named_parameters():
                if "lora_B" in key or "ia3_l" in key:
                    param.add_(torch.randn_like(param) * 0.3)
        twin.save_pretrained(tmp_path / name)
        twins[name] = twin.eval()
    preload = tuple(str(tmp_path / name) for name in configs)
    servers = [start_server(tiny_bloom, span, adapters=AdapterConfig(preload=preload), throughput=100.0)
               for span in ((0, 4), (4, 6))]
    model = client(tiny_bloom, [s.endpoint for s in servers])
    for name, twin in twins.items():
        with torch.no_grad():
            want = twin.generate(IDS, attention_mask=MASK, **GREEDY)
        assert want.tolist() != bloom_ref.generate(IDS, attention_mask=MASK, **GREEDY).tolist()
        assert model.generate(IDS, attention_mask=MASK, adapter=name, **GREEDY).tolist() == want.tolist()


# --- checkpoints ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["causal-lm", "base-model"])
def test_both_checkpoint_layouts(tmp_path, start_server, layout):
    """`transformer.h.N...` (BloomForCausalLM.save_pretrained) and `h.N...` (the hub's BLOOM checkpoints); the
    second with the residual after the layer norms."""
    base = layout == "base-model"
    path = make_tiny_bloom(tmp_path / layout, layers=4, seed=5, base_layout=base,
                           apply_residual_connection_post_layernorm=base)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    assert ("h.0.input_layernorm.weight" in stored) == base
    assert ("transformer.h.0.input_layernorm.weight" in stored) != base
    source = ModelSource(str(path))
    assert sorted(source.load_tensors(["transformer.h.3."])) == sorted(
        f"transformer.h.3.{name}" for name in BloomFamily().build_block(source.config(), 3).state_dict())
    ref = reference(path)
    servers = [start_server(path, span, throughput=100.0) for span in ((0, 1), (1, 4))]
    model = client(path, [s.endpoint for s in servers])
    expected = ref.generate(IDS, attention_mask=MASK, **GREEDY)
    assert model.generate(IDS, attention_mask=MASK, **GREEDY).tolist() == expected.tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS, attention_mask=MASK).logits[MASK.bool()],
                                   ref(IDS, attention_mask=MASK).logits[MASK.bool()], atol=1e-5, rtol=1e-5)


# --- recovery, with servers started through the CLI (`swarm serve PATH`) ----------------------------------------------


@pytest.mark.slow
def test_generation_survives_a_killed_server(tmp_path, fork_serve):
    from test_recovery import FAST, KillDuring, connect, start_all

    path = make_tiny_bloom(tmp_path / "bloom-ft", layers=4, seed=21)
    ref = reference(path)
    first = fork_serve(str(path), "--blocks", "0:2", *FAST)
    others = start_all(fork_serve, path, [(2, 4), (2, 4)], [first.endpoint])
    model = connect(path, first, 3)
    expected = ref.generate(IDS[:2], attention_mask=MASK[:2], **GREEDY)
    with model, model.inference_session(max_length=32) as session:
        killer = KillDuring(session, others, at=[3])
        got = model.generate(IDS[:2], attention_mask=MASK[:2], **GREEDY)
        assert session.recoveries == 1
    assert len(killer.killed) == 1
    assert got.tolist() == expected.tolist()


@pytest.mark.slow
def test_swarm_serve_picks_its_blocks_and_status_shows_them(tmp_path, fork_serve):
    """`swarm serve PATH` with no --blocks: it measures a BLOOM block, costs one in memory, picks its span and
    serves; `swarm status` reports the model whole."""
    from conftest import fork_swarm, swarm_env
    from test_recovery import FAST, connect

    path = make_tiny_bloom(tmp_path / "bloom-cli", layers=4, seed=8)
    server = fork_serve(str(path), *FAST)
    with connect(path, server, 1) as model:
        expected = reference(path).generate(IDS, attention_mask=MASK, **GREEDY)
        assert model.generate(IDS, attention_mask=MASK, **GREEDY).tolist() == expected.tolist()
    status = fork_swarm("status", "--initial-peers", server.endpoint, "--no-mdns", "--wait", "0.6", "--json",
                        env=swarm_env(tmp_path))
    assert status.returncode == 0, status.stderr
    (found,) = json.loads(status.stdout)["models"]
    assert found["num_blocks"] == 4 and found["complete"] and found["servers_per_block"] == [1, 1, 1, 1]
