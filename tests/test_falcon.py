"""The Falcon family against plain transformers on the same weights (float32), in both decoder architectures: the new
one (grouped key/value heads, two layer norms or one) and the old one (multi-query and parallel, or one key/value
head per query head and sequential), and with ALiBi instead of rotary embeddings (falcon-rw). Greedy tokens through 2
and 3 servers, in and out of sessions, with left padding; logits; deep prompts and LoRA gradients; served PEFT
adapters; clients batched in one pass; recovery after a killed server; `swarm serve` and `swarm status` on a
checkpoint that names no architecture; the configs transformers itself cannot run, refused."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from conftest import load_reference
from test_recovery import FAST, KillDuring, connect, start_all

from swarm import AutoDistributedModelForCausalLM
from swarm.cli.app import run
from swarm.core.client.config import ClientConfig
from swarm.core.client.lora import new_lora
from swarm.core.models import family_for
from swarm.core.models.falcon import FalconFamily
from swarm.core.server import Server, ServerConfig
from swarm.core.server.adapters import AdapterConfig
from swarm.core.server.backend import BlockSpan
from swarm.core.server.placement import block_cost
from swarm.core.weights import ModelSource
from swarm.transport.errors import ConfigError
from swarm.transport.rpc import RpcClient

LAYERS = 6
VARIANTS: dict[str, dict[str, Any]] = {
    # falcon-40b/180b's shape: grouped key/value heads, attention and MLP in parallel with a layer norm each
    "new-gqa-2ln": dict(new_decoder_architecture=True, num_attention_heads=4, num_kv_heads=2),
    # falcon-7b's shape: one key/value head, attention and MLP in parallel under one layer norm
    "old-mq-parallel": dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True,
                            num_attention_heads=4),
    # the old architecture with a key/value head per query head, attention then MLP, biases
    "old-sequential": dict(new_decoder_architecture=False, multi_query=False, parallel_attn=False,
                           num_attention_heads=4, bias=True),
    # falcon-rw's shape: ALiBi position biases instead of rotary embeddings, sequential, biases
    "rw-alibi": dict(alibi=True, new_decoder_architecture=False, multi_query=False, parallel_attn=False,
                     num_attention_heads=4, bias=True),
}
# only checked block by block (cheap): the new architecture with one shared layer norm (as Falcon2-11B), tied head
MORE = {"new-gqa-1ln": dict(new_decoder_architecture=True, num_attention_heads=8, num_kv_heads=2,
                            num_ln_in_parallel_attn=1, tie_word_embeddings=True),
        # ALiBi with one key/value head, and a head count that is not a power of 2 (ALiBi's second slope series)
        "rw-alibi-mq": dict(alibi=True, multi_query=True, parallel_attn=True, num_attention_heads=6,
                            hidden_size=48)}
ONE = "new-gqa-2ln"  # the layout the costlier checks run on (every layout's blocks are checked against transformers)
TWO, THREE = ((0, 3), (3, 6)), ((0, 2), (2, 4), (4, 6))


def make_falcon(path: Path, variant: str, seed: int = 0, layers: int = LAYERS, **overrides: Any) -> Path:
    """Save a tiny random FalconForCausalLM of `variant` (VARIANTS, MORE) to `path`."""
    from transformers import FalconConfig, FalconForCausalLM

    kwargs = dict(hidden_size=64, num_hidden_layers=layers, vocab_size=128, max_position_embeddings=256,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kwargs.update({**VARIANTS, **MORE}[variant])
    kwargs.update(overrides)
    torch.manual_seed(seed)
    FalconForCausalLM(FalconConfig(**kwargs)).eval().save_pretrained(path)
    return path


def client(path: Path, endpoints: list[str], **kwargs: Any):
    return AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=endpoints, **kwargs)


def start(path: Path, spans, **kwargs: Any) -> list[Server]:
    return [Server(ServerConfig(str(path), span, host="127.0.0.1", poll_ms=20, **kwargs)).start() for span in spans]


@pytest.fixture(scope="module", params=list(VARIANTS))
def falcon(request, tmp_path_factory) -> Iterator[tuple[str, Path, Any, dict[str, list[str]]]]:
    """(variant, checkpoint, transformers reference, endpoints of a 2-server and a 3-server swarm of it)."""
    variant = request.param
    path = make_falcon(tmp_path_factory.mktemp("falcon") / variant, variant, seed=list(VARIANTS).index(variant))
    servers: list[Server] = []
    try:
        swarms = {}
        for name, spans in (("two", TWO), ("three", THREE)):
            started = start(path, spans)
            servers += started
            swarms[name] = [s.endpoint for s in started]
        yield variant, path, load_reference(path), swarms
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def new_arch(tmp_path_factory) -> Path:
    """A new-architecture Falcon for the tests that need their own servers."""
    return make_falcon(tmp_path_factory.mktemp("falcon-new") / "falcon-new", "new-gqa-2ln", seed=7)


# --- the blocks themselves ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [*VARIANTS, *MORE])
def test_blocks_equal_transformers_in_every_layout(variant, tmp_path):
    """A span of all blocks (no servers): whole padded sequences, and the same tokens in two cached steps."""
    path = make_falcon(tmp_path / variant, variant, seed=3, layers=3)
    ref = load_reference(path)
    source = ModelSource(str(path))
    span = BlockSpan.load(source, 0, 3, torch.float32)
    config = source.config("float32")
    heads = config.num_attention_heads
    kv = {"new-gqa-2ln": 2, "old-mq-parallel": 1, "old-sequential": heads, "rw-alibi": heads, "new-gqa-1ln": 2,
          "rw-alibi-mq": 1}[variant]
    head_dim = config.hidden_size // heads
    assert (span.kv_heads, span.head_dim) == (kv, head_dim)
    cost = block_cost(source.family(), config, torch.float32)
    assert cost.cache_per_token == 2 * kv * head_dim * 4
    ids = torch.tensor([[0, 0, 0, 5, 17, 99, 3], [1, 2, 3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    with torch.no_grad():
        out = ref(ids, attention_mask=mask, output_hidden_states=True)
        embeds, expected = out.hidden_states[0], out.hidden_states[-1]  # the last is after ln_f
        whole = ref.transformer.ln_f(span(embeds, mask))
        cache = span.new_cache(2, 16)
        steps = [span.step(embeds[:, :5], cache, mask[:, :5]), span.step(embeds[:, 5:], cache, mask[:, 5:])]
        stepped = ref.transformer.ln_f(torch.cat(steps, dim=1))
    real = mask.bool()
    torch.testing.assert_close(whole[real], expected[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stepped[real], expected[real], atol=1e-5, rtol=1e-5)


# --- through servers ------------------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_by_forward(model, ids: torch.Tensor, mask: torch.Tensor, new: int, eos: int = 2, pad: int = 0
                      ) -> list[list[int]]:
    """Greedy decoding with a whole-sequence `forward` per token (no cache anywhere), finished rows padded as
    transformers' `generate` pads them."""
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(new):
        token = model(ids, attention_mask=mask).logits[:, -1].argmax(-1).masked_fill(done, pad)
        done |= token == eos
        ids, mask = torch.cat([ids, token[:, None]], dim=1), torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if done.all():
            break
    return ids.tolist()


@pytest.mark.parametrize("servers", ["two", "three"])
def test_greedy_tokens_equal_transformers(falcon, servers):
    """Left-padded rows of different lengths, greedy: `generate` (in the session it opens, and in one kept across
    calls), and whole-sequence forwards without any session."""
    _, path, ref, swarms = falcon
    ids = torch.tensor([[0, 0, 0, 5, 17, 99, 3], [1, 2, 3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = ref.generate(ids, **kwargs).tolist()
    assert greedy_by_forward(ref, ids, mask, 8) == expected  # the loop below decodes as generate does
    with client(path, swarms[servers]) as model:
        outside = model.generate(ids, **kwargs).tolist()
        with model.inference_session(max_length=32):
            inside = model.generate(ids, **kwargs).tolist()
        forwards = greedy_by_forward(model, ids, mask, 8)
    assert outside == expected and inside == expected and forwards == expected
    # the padded row generates what it generates alone
    assert expected[0][3:] == ref.generate(ids[:1, 3:], max_new_tokens=8, do_sample=False).tolist()[0]


def test_logits_allclose_with_padding(falcon):
    _, path, ref, swarms = falcon
    ids = torch.tensor([[3, 9, 27, 81, 1, 2], [0, 0, 4, 8, 16, 32]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    with client(path, swarms["three"]) as model, torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        expected = ref(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_session_continues_across_generate_calls(falcon):
    _, path, ref, swarms = falcon
    ids = torch.tensor([[5, 17, 99, 3]])
    with client(path, swarms["two"]) as model, model.inference_session(max_length=32):
        first = model.generate(ids, max_new_tokens=4, do_sample=False)
        second = model.generate(torch.cat([first, torch.tensor([[7, 8]])], dim=1), max_new_tokens=4, do_sample=False)
    expected = ref.generate(torch.cat([first, torch.tensor([[7, 8]])], dim=1), max_new_tokens=4, do_sample=False)
    assert second.tolist() == expected.tolist()


def test_client_holds_embeddings_norm_and_an_untied_head(falcon):
    """The client holds transformer.word_embeddings, transformer.ln_f and lm_head."""
    _, path, ref, swarms = falcon
    with client(path, swarms["two"]) as model:
        torch.testing.assert_close(model.get_input_embeddings().weight, ref.transformer.word_embeddings.weight)
        torch.testing.assert_close(model.lm_head.weight, ref.lm_head.weight)
        assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()


def test_tied_head_is_the_embeddings(tmp_path):
    tied = make_falcon(tmp_path / "tied", ONE, seed=5, layers=2, tie_word_embeddings=True)
    servers = start(tied, ((0, 1), (1, 2)))
    try:
        with client(tied, [s.endpoint for s in servers]) as model:
            assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
            ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
            expected = load_reference(tied).generate(ids, max_new_tokens=6, do_sample=False)
            assert model.generate(ids, max_new_tokens=6, do_sample=False).tolist() == expected.tolist()
    finally:
        for server in servers:
            server.stop()


# --- prompt tuning --------------------------------------------------------------------------------------------------

IDS = torch.tensor([[5, 9, 17, 3, 44, 2], [7, 1, 8, 0, 0, 0], [99, 4, 4, 4, 12, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])  # right padding
PRE = 4


def local_hidden(ref, ids, mask, prompts, deep):
    """Plain transformers with the prompts in front and, for deep prompts, each block's prompt added before it."""
    batch, pre = ids.shape[0], prompts.shape[0]
    x = torch.cat([prompts[None].expand(batch, -1, -1), ref.transformer.word_embeddings(ids)], dim=1)
    full = torch.cat([torch.ones(batch, pre, dtype=mask.dtype), mask], dim=1)
    positions = (full.cumsum(-1) - 1).clamp(min=0)
    hooks = []
    if deep is not None:
        for i, layer in enumerate(ref.transformer.h):
            def add(module, args, kwargs, i=i):
                hidden = torch.cat([args[0][:, :pre] + deep[i][None], args[0][:, pre:]], dim=1)
                return (hidden, *args[1:]), kwargs
            hooks.append(layer.register_forward_pre_hook(add, with_kwargs=True))
    try:
        return ref.transformer(inputs_embeds=x, attention_mask=full, position_ids=positions).last_hidden_state
    finally:
        for hook in hooks:
            hook.remove()


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("falcon", [ONE], indirect=True)
@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_prompt_tuning_gradients_match_transformers(falcon, mode):
    _, path, ref, swarms = falcon
    torch.manual_seed(1)
    labels = IDS.masked_fill(MASK == 0, -100)
    with client(path, swarms["two"], tuning_mode=mode, pre_seq_len=PRE) as model:
        if model.tuning.deep_prompts is not None:
            with torch.no_grad():
                model.tuning.deep_prompts.normal_(0, 0.1)
        out = model(input_ids=IDS, attention_mask=MASK, labels=labels)
        out.loss.backward()
        prompts = leaf(model.tuning.prompts)
        deep = leaf(model.tuning.deep_prompts) if mode == "deep_ptune" else None
        logits = ref.lm_head(local_hidden(ref, IDS, MASK, prompts, deep)[:, PRE:])
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        real = MASK.bool()
        torch.testing.assert_close(out.logits[real], logits[real], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(model.tuning.prompts.grad, prompts.grad, rtol=1e-4, atol=1e-6)
        if deep is not None:
            assert deep.grad.abs().sum() > 0
            torch.testing.assert_close(model.tuning.deep_prompts.grad, deep.grad, rtol=1e-4, atol=1e-6)
    ref.zero_grad(set_to_none=True)


# --- LoRA: the client's, and PEFT adapters the servers serve --------------------------------------------------------

LORA_IDS = torch.tensor([[5, 60, 61, 62, 63, 64, 65, 66], [5, 70, 71, 72, 73, 74, 0, 0]])
LORA_MASK = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])


def peft_twin(path: Path, lora) -> Any:
    """PEFT's LoRA on the local transformers Falcon, with exactly the client's A and B."""
    targets = sorted({m.rsplit(".", 1)[-1] for m in lora.targets})
    twin = peft.get_peft_model(load_reference(path), peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha,
                                                                      target_modules=targets, lora_dropout=0.0))
    params = dict(twin.named_parameters())
    with torch.no_grad():
        for (block, module), (a, b) in lora.per_block().items():
            params[f"base_model.model.transformer.h.{block}.{module}.lora_A.default.weight"].copy_(a)
            params[f"base_model.model.transformer.h.{block}.{module}.lora_B.default.weight"].copy_(b)
    return twin.eval()


@pytest.mark.parametrize("falcon", [ONE], indirect=True)
def test_client_lora_on_fused_qkv_and_mlp_equals_peft(falcon):
    _, path, _, swarms = falcon
    targets = ["query_key_value", "dense_h_to_4h", "dense_4h_to_h"]
    labels = LORA_IDS.masked_fill(LORA_MASK == 0, -100)
    with client(path, swarms["three"], tuning_mode="lora", lora_rank=4, lora_alpha=8, lora_targets=targets,
                config=ClientConfig(max_request_tokens=8)) as model:  # two requests per server: gradients add up
        lora = model.tuning
        assert lora.targets == ["mlp.dense_4h_to_h", "mlp.dense_h_to_4h", "self_attention.query_key_value"]
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for param in lora.b.values():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        twin = peft_twin(path, lora)
        model.train()
        out = model(input_ids=LORA_IDS, attention_mask=LORA_MASK, labels=labels)
        out.loss.backward()
        expected = twin(input_ids=LORA_IDS, attention_mask=LORA_MASK, labels=labels)
        expected.loss.backward()
        real = LORA_MASK.bool()
        torch.testing.assert_close(out.logits[real], expected.logits[real], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.loss, expected.loss, atol=1e-5, rtol=1e-5)
        params = dict(twin.named_parameters())
        for module in lora.targets:
            for part, stack in (("A", lora.a[module.replace(".", "__")]), ("B", lora.b[module.replace(".", "__")])):
                for block in range(LAYERS):
                    want = params[f"base_model.model.transformer.h.{block}.{module}.lora_{part}.default.weight"]
                    torch.testing.assert_close(stack.grad[block], want.grad, atol=1e-5, rtol=1e-4)
        model.eval()
        ids = LORA_IDS[:1, :6]
        with torch.no_grad():
            want = twin.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        with model.inference_session(max_length=16):
            assert model.generate(ids, max_new_tokens=6, do_sample=False).tolist() == want.tolist()


def test_lora_targets_default_to_pefts_and_unknown_ones_are_refused(new_arch):
    source = ModelSource(str(new_arch))
    family, config = source.family(), source.config("float32")
    assert new_lora(family, config, LAYERS, None, None, None, torch.float32).targets == \
        ["self_attention.query_key_value"]  # PEFT's default target for Falcon
    with pytest.raises(ConfigError, match=r"'q_proj' is not a linear layer.*query_key_value"):
        new_lora(family, config, LAYERS, None, None, ["q_proj"], torch.float32)


SERVED = {
    "falcon-lora": lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                                           target_modules=["query_key_value", "dense", "dense_4h_to_h"]),
    "falcon-ia3": lambda: peft.IA3Config(task_type="CAUSAL_LM"),  # PEFT's Falcon default: qkv, dense_4h_to_h
}


@pytest.fixture(scope="module")
def served(new_arch, tmp_path_factory) -> Iterator[tuple[dict[str, Any], list[str]]]:
    """PEFT adapters made on the new-architecture Falcon (random non-zero tensors), and two servers holding them."""
    root = tmp_path_factory.mktemp("falcon-adapters")
    twins = {}
    for i, (name, config) in enumerate(SERVED.items()):
        twin = peft.get_peft_model(load_reference(new_arch), config())
        generator = torch.Generator().manual_seed(40 + i)
        with torch.no_grad():
            for key, p in twin.named_parameters():
                if "ia3_l" in key:
                    p.copy_(1 + 0.5 * torch.randn(p.shape, generator=generator))
                elif "lora_" in key:
                    p.copy_(0.3 * torch.randn(p.shape, generator=generator))
        twin.save_pretrained(root / name)
        twins[name] = twin.eval()
    servers = start(new_arch, TWO, adapters=AdapterConfig(preload=tuple(str(root / name) for name in SERVED)))
    try:
        yield twins, [s.endpoint for s in servers]
    finally:
        for server in servers:
            server.stop()


@pytest.mark.parametrize("name", list(SERVED))
def test_served_adapter_equals_peft(new_arch, served, name):
    twins, endpoints = served
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(8))
    with client(new_arch, endpoints) as model, torch.no_grad():
        expected = twins[name](input_ids=ids).logits
        with model.use_adapter(name):
            logits = model(ids).logits
        plain = model(ids).logits
        assert (expected - plain).abs().max() > 1e-2  # the adapter changes the model: equality means something
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
        want = twins[name].generate(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=6,
                                    do_sample=False)
        assert model.generate(ids[:1], max_new_tokens=6, do_sample=False, adapter=name).tolist() == want.tolist()


# --- several clients in one pass ------------------------------------------------------------------------------------

WORK = [([5, 17, 99, 3], 10), ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 6), ([42], 9), ([100, 3, 64, 12, 9], 7)]


def test_clients_batched_in_one_pass_get_their_solo_tokens(new_arch):
    ref = load_reference(new_arch)
    expected = [ref.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False)[0].tolist() for p, n in WORK]
    servers = start(new_arch, TWO)
    try:
        endpoints = [s.endpoint for s in servers]
        models = [client(new_arch, endpoints, config=ClientConfig(relay=i % 2 == 1)) for i in range(len(WORK))]
        results: list[Any] = [None] * len(WORK)
        barrier = threading.Barrier(len(WORK))

        def generate(i: int) -> None:
            prompt, new = WORK[i]
            barrier.wait(30)
            try:
                results[i] = models[i].generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False)[0].tolist()
            except Exception as e:  # compared below
                results[i] = e

        threads = [threading.Thread(target=generate, args=(i,), daemon=True) for i in range(len(WORK))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for model in models:
            model.close()
        assert results == expected
        for server in servers:
            with RpcClient(server.endpoint) as rpc:
                assert rpc.call("info").fields["batch"]["peak_sessions"] >= 2  # sessions did share passes
    finally:
        for server in servers:
            server.stop()


# --- recovery -------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_generation_survives_a_killed_server(tmp_path, fork_serve):
    path = make_falcon(tmp_path / "falcon-mq", "old-mq-parallel", seed=21, layers=4)
    ref = load_reference(path)
    first = fork_serve(str(path), "--blocks", "0:2", *FAST)
    others = start_all(fork_serve, path, [(2, 4), (2, 4)], [first.endpoint])
    model = connect(path, first, 3)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9], [7, 3, 9, 1, 4, 4, 2]])
    kwargs = dict(attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7]), max_new_tokens=10, do_sample=False,
                  pad_token_id=0)
    expected = ref.generate(ids, **kwargs)
    with model, model.inference_session(max_length=32) as session:
        killer = KillDuring(session, others, at=[4])
        got = model.generate(ids, **kwargs)
        assert session.recoveries == 1 and len(killer.killed) == 1
    assert got.tolist() == expected.tolist()


# --- the CLI, the lookup by model_type, and what is refused ---------------------------------------------------------


@pytest.mark.slow
def test_swarm_serve_and_status_on_a_checkpoint_without_architectures(tmp_path, fork_serve, capsys):
    """`swarm serve PATH` (no --blocks: it sizes its span from Falcon's block cost and measures one block) on a config
    that names no architecture (as one converted from GGUF): found by model_type; `swarm status` shows it."""
    path = make_falcon(tmp_path / "falcon-anon", "old-sequential", seed=9, layers=4)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    del config["architectures"]
    config_file.write_text(json.dumps(config))
    assert isinstance(ModelSource(str(path)).family(), FalconFamily)
    server = fork_serve(str(path), *FAST)
    assert run(["status", "--initial-peers", server.endpoint, "--no-mdns", "--wait", "1", "--json"]) == 0
    (model,) = json.loads(capsys.readouterr().out)["models"]
    assert model["num_blocks"] == 4 and model["complete"]
    ids = torch.tensor([[9, 8, 7, 6, 5]])
    expected = load_reference(path).generate(ids, max_new_tokens=8, do_sample=False)
    with client(path, [server.endpoint]) as remote:
        assert remote.generate(ids, max_new_tokens=8, do_sample=False).tolist() == expected.tolist()
    assert server.stop(signal.SIGTERM) == 0


def falcon_config(**overrides: Any) -> Any:
    from transformers import FalconConfig

    return FalconConfig(**{"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 128,
                           "architectures": ["FalconForCausalLM"], **overrides})


def test_family_by_architecture_and_by_model_type():
    assert isinstance(family_for(falcon_config()), FalconFamily)
    assert isinstance(family_for(falcon_config(architectures=None)), FalconFamily)


@pytest.mark.parametrize("overrides,match", [
    (dict(new_decoder_architecture=True, num_kv_heads=3), "cannot share 3 key/value heads"),
    (dict(new_decoder_architecture=True, num_kv_heads=2, parallel_attn=False), "parallel_attn=false"),
    (dict(multi_query=False, num_kv_heads=2), "num_kv_heads=2 to the old decoder architecture"),
    (dict(num_ln_in_parallel_attn=2), "two layer norms"),
])
def test_configs_transformers_cannot_run_are_refused(overrides, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        family_for(falcon_config(**overrides))
    if "num_ln_in_parallel_attn" in overrides:  # a server refuses it before loading anything, with the same words
        path = tmp_path / "falcon-bad"
        path.mkdir()
        falcon_config(**overrides).save_pretrained(path)
        with pytest.raises(ConfigError, match=match):
            Server(ServerConfig(str(path), (0, 2), host="127.0.0.1")).start()


def test_a_peft_lora_on_what_the_client_holds_is_refused_clearly(new_arch, tmp_path):
    """PEFT also adapts the embeddings; on a swarm they are the client's, not a block's: one clear error."""
    from swarm.core.adapters import model_linears, read_peft

    twin = peft.get_peft_model(load_reference(new_arch), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["word_embeddings", "query_key_value"], lora_dropout=0.0))
    twin.save_pretrained(tmp_path / "embeddings-lora")
    source = ModelSource(str(new_arch))
    family, config = source.family(), source.config("float32")
    with pytest.raises(ConfigError, match=r"targets 'transformer.word_embeddings'.*not in a block"):
        read_peft(str(tmp_path / "embeddings-lora"), family, config, 0, LAYERS,
                  lambda i: model_linears(family, config, i), torch.float32)


def test_alibi_over_long_padded_sequences_in_steps(tmp_path):
    """Positions past 256, where transformers' bfloat16 ALiBi rounds: the same biases, whole and in cached steps."""
    path = make_falcon(tmp_path / "rw", "rw-alibi", seed=4, layers=2, max_position_embeddings=512)
    ref = load_reference(path)
    span = BlockSpan.load(ModelSource(str(path)), 0, 2, torch.float32)
    ids = torch.randint(3, 128, (2, 300), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :37] = 0
    with torch.no_grad():
        out = ref(ids, attention_mask=mask, output_hidden_states=True)
        embeds, expected = out.hidden_states[0], out.hidden_states[-1]
        cache = span.new_cache(2, 320)
        steps = [span.step(embeds[:, a:b], cache, mask[:, a:b]) for a, b in ((0, 200), (200, 299), (299, 300))]
        got = ref.transformer.ln_f(torch.cat(steps, dim=1))
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
