"""A LoRA the client owns, trained through frozen remote blocks: logits and gradients equal PEFT's LoRA on the local
model, generation with it equals PEFT's, the saved result is a PEFT adapter that PEFT loads and swarm serves, and the
whole loop (`swarm tune --mode lora`, `swarm serve --adapters`, `swarm chat --adapter`) prints what the local PEFT
model generates."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import fork_swarm, load_reference, make_tokenized_model, swarm_env

from swarm import AutoDistributedModelForCausalLM, AutoDistributedModelForSequenceClassification
from swarm.core.client.config import ClientConfig
from swarm.core.server import Server, ServerConfig
from swarm.core.server.adapters import AdapterConfig
from swarm.core.tune import Trainer, TuneConfig, load_data
from swarm.transport.errors import ConfigError

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.tensor([[5, 60, 61, 62, 63, 64, 65, 66], [5, 70, 71, 72, 73, 74, 0, 0]])
MASK = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
LABELS = IDS.masked_fill(MASK == 0, -100)


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory) -> Path:
    """A tiny random Llama with swarm's byte-level tokenizer (and its chat template)."""
    return make_tokenized_model(tmp_path_factory.mktemp("lora") / "lora-llama", layers=4, seed=11)


@pytest.fixture(scope="module")
def servers(lora_model) -> Iterator[list[str]]:
    started = [Server(ServerConfig(str(lora_model), span, host="127.0.0.1")) for span in ((0, 1), (1, 4))]
    try:
        yield [server.start().endpoint for server in started]
    finally:
        for server in started:
            server.stop()


def randomize(model, seed: int = 3) -> None:
    """Give the LoRA's B non-zero values (a fresh LoRA changes nothing, which would test nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.tuning.b.values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def peft_twin(path: Path, model, task: str = "lm"):
    """PEFT's LoRA on the local transformers model, with exactly the client's A and B."""
    import peft
    from transformers import AutoModelForSequenceClassification

    lora = model.tuning
    if task == "lm":
        base = load_reference(path)
    else:
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32).eval()
        base.score.weight.data.copy_(model.score.weight.data)
    targets = sorted({m.rsplit(".", 1)[-1] for m in lora.targets})
    twin = peft.get_peft_model(base, peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=targets,
                                                     lora_dropout=0.0))
    params = dict(twin.named_parameters())
    with torch.no_grad():
        for (block, module), (a, b) in lora.per_block().items():
            prefix = f"base_model.model.model.layers.{block}.{module}"
            params[f"{prefix}.lora_A.default.weight"].copy_(a)
            params[f"{prefix}.lora_B.default.weight"].copy_(b)
    return twin.eval()


def test_lora_logits_and_gradients_equal_peft(lora_model, servers):
    # requests of 8 tokens: the batch of 2 goes as two requests per server, whose LoRA gradients add up
    config = ClientConfig(max_request_tokens=8)
    with AutoDistributedModelForCausalLM.from_pretrained(str(lora_model), initial_peers=servers, tuning_mode="lora",
                                                         lora_rank=4, lora_alpha=8, lora_targets=["all-linear"],
                                                         config=config) as model:
        assert sorted(m.rsplit(".", 1)[-1] for m in model.tuning.targets) == sorted(ALL)
        randomize(model)
        twin = peft_twin(lora_model, model)
        model.train()
        out = model(input_ids=IDS, attention_mask=MASK, labels=LABELS)
        out.loss.backward()
        expected = twin(input_ids=IDS, attention_mask=MASK, labels=LABELS)
        expected.loss.backward()
        valid = MASK.bool()
        torch.testing.assert_close(out.logits[valid], expected.logits[valid], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.loss, expected.loss, atol=1e-5, rtol=1e-5)
        params = dict(twin.named_parameters())
        lora = model.tuning
        checked = 0
        for module in lora.targets:
            for part, stack in (("A", lora.a[module.replace(".", "__")]), ("B", lora.b[module.replace(".", "__")])):
                for block in range(lora.num_blocks):
                    want = params[f"base_model.model.model.layers.{block}.{module}.lora_{part}.default.weight"].grad
                    assert stack.grad is not None and want is not None
                    torch.testing.assert_close(stack.grad[block], want, atol=1e-5, rtol=1e-4)
                    checked += 1
        assert checked == 2 * 7 * 4
        assert [p for p in model.trainable_parameters()] == list(lora.parameters())


def test_classifier_lora_equals_peft(lora_model, servers):
    torch.manual_seed(0)
    with AutoDistributedModelForSequenceClassification.from_pretrained(
            str(lora_model), num_labels=2, initial_peers=servers, tuning_mode="lora", lora_rank=2,
            lora_targets=["q_proj", "down_proj"]) as model:
        randomize(model, seed=4)
        twin = peft_twin(lora_model, model, task="classification")
        ids = IDS[:, :6]  # no padding: transformers finds the last token by the pad id, swarm by the mask
        out = model(input_ids=ids, labels=torch.tensor([0, 1]))
        out.loss.backward()
        expected = twin(input_ids=ids, labels=torch.tensor([0, 1]))
        expected.loss.backward()
        torch.testing.assert_close(out.logits, expected.logits, atol=1e-4, rtol=1e-4)
        grad = dict(twin.named_parameters())["base_model.model.model.layers.2.mlp.down_proj.lora_B.default.weight"]
        torch.testing.assert_close(model.tuning.b["mlp__down_proj"].grad[2], grad.grad, atol=1e-5, rtol=1e-4)
        assert model.score.weight.grad is not None


def test_generate_with_the_clients_lora_equals_peft(lora_model, servers):
    with AutoDistributedModelForCausalLM.from_pretrained(str(lora_model), initial_peers=servers, tuning_mode="lora",
                                                         lora_rank=4, lora_targets=["q_proj", "v_proj", "up_proj"]
                                                         ) as model:
        randomize(model, seed=5)
        twin = peft_twin(lora_model, model)
        ids = IDS[:1, :6]
        with torch.no_grad():
            want = twin.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
        assert model.generate(ids, max_new_tokens=10, do_sample=False).tolist() == want.tolist()
        with model.inference_session(max_length=20):  # the servers hold the LoRA with the session
            first = model.generate(ids, max_new_tokens=4, do_sample=False)
            more = model.generate(first, max_new_tokens=6, do_sample=False)
        assert more.tolist() == want.tolist()


def test_lora_options_are_checked(lora_model, servers):
    with pytest.raises(ConfigError, match="lora-targets.*lm_head.*choose from"):
        AutoDistributedModelForCausalLM.from_pretrained(str(lora_model), initial_peers=servers, tuning_mode="lora",
                                                        lora_targets=["lm_head"])
    with pytest.raises(ConfigError, match="lora-rank"):
        AutoDistributedModelForCausalLM.from_pretrained(str(lora_model), initial_peers=servers, tuning_mode="lora",
                                                        lora_rank=0)
    with pytest.raises(ConfigError, match="need tuning_mode='lora'"):
        AutoDistributedModelForCausalLM.from_pretrained(str(lora_model), initial_peers=servers, lora_rank=4)


def chat_reference(path: Path, model, text: str, max_new_tokens: int) -> str:
    """What `swarm chat --prompt TEXT` prints for a fresh conversation, computed by `model` (a local transformers or
    PEFT model) with the chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_tune_serve_and_chat_with_a_lora(lora_model, servers, tmp_path):
    """The whole loop: tune a LoRA through two servers (CLI), load it with PEFT, serve it, chat with it."""
    import peft

    text = "the swarm runs the blocks and the client tunes a lora. " * 4
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for _ in range(12)))
    out = tmp_path / "support-lora"
    result = fork_swarm("tune", str(lora_model), "--dataset", str(data), "--task", "lm", "--mode", "lora",
                        "--lora-rank", "4", "--lora-targets", "q_proj", "v_proj", "down_proj", "--max-steps", "4",
                        "--batch-size", "4", "--lr", "0.02", "--max-length", "48", "--json", "--output", str(out),
                        "--initial-peers", *servers, env=swarm_env(tmp_path))
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[-1]["event"] == "done" and events[-1]["step"] == 4
    peft_config = json.loads((out / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "LORA" and peft_config["r"] == 4
    assert sorted(peft_config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    # PEFT loads it onto the local model, with the logits the swarm computes with the saved LoRA
    local = peft.PeftModel.from_pretrained(load_reference(lora_model), str(out)).eval()
    with AutoDistributedModelForCausalLM.from_pretrained(str(lora_model), initial_peers=servers,
                                                         prompts=str(out)) as model:
        assert model.tuning.rank == 4
        with torch.no_grad():
            torch.testing.assert_close(model(IDS[:1]).logits, local(IDS[:1]).logits, atol=1e-4, rtol=1e-4)
            assert (model(IDS[:1]).logits - load_reference(lora_model)(IDS[:1]).logits).abs().max() > 1e-3
    # continue training from the saved LoRA
    more = fork_swarm("tune", str(lora_model), "--dataset", str(data), "--task", "lm", "--prompts", str(out),
                      "--max-steps", "1", "--batch-size", "4", "--max-length", "48", "--output",
                      str(tmp_path / "more"), "--initial-peers", *servers, env=swarm_env(tmp_path))
    assert more.returncode == 0, more.stderr
    assert json.loads((tmp_path / "more" / "tuning_config.json").read_text())["tuning_mode"] == "lora"
    # serve it and chat with it: the answer is the local PEFT model's
    adapters = AdapterConfig(preload=(str(out),))
    served = [Server(ServerConfig(str(lora_model), span, host="127.0.0.1", adapters=adapters)) for span in
              ((0, 2), (2, 4))]
    try:
        endpoints = [server.start().endpoint for server in served]
        assert served[0].record().adapters == ("support-lora",)
        chat = fork_swarm("chat", str(lora_model), "--adapter", "support-lora", "--prompt", "the swarm",
                          "--max-new-tokens", "8", "--initial-peers", *endpoints, env=swarm_env(tmp_path))
        assert chat.returncode == 0, chat.stderr
        expected = chat_reference(lora_model, local, "the swarm", 8)
        assert chat.stdout == expected + "\n"
        assert expected != chat_reference(lora_model, load_reference(lora_model), "the swarm", 8)
    finally:
        for server in served:
            server.stop()


def test_lm_lora_is_learnt_through_the_swarm(lora_model, servers, tmp_path):
    text = "abab abab abab abab abab abab abab abab. " * 3
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for _ in range(8)))
    data = load_data(str(path), task="lm")
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    with AutoDistributedModelForCausalLM.from_pretrained(str(lora_model), initial_peers=servers, tuning_mode="lora",
                                                         lora_rank=4) as model:
        trainer = Trainer(model, AutoTokenizer.from_pretrained(lora_model), data, TuneConfig(
            task="lm", mode="lora", batch_size=4, lr=0.02, max_steps=6, max_length=48))
        first = trainer.evaluate()["val_perplexity"]
        final = trainer.run()
    assert final["val_perplexity"] < first


def test_loras_kept_with_sessions_are_bounded(lora_model, start_server):
    """A client's LoRA kept with a session costs the server memory until the session ends: all of them together are
    bounded, past the bound an open is refused busy (and nothing is kept), and closing frees room."""
    from swarm.core.server.handler import HandlerLimits
    from swarm.transport.errors import ServerBusy
    from swarm.transport.messages import Close, LoraWeights, Open, OpenReply
    from swarm.transport.rpc import RpcClient

    q = "self_attn.q_proj"
    lora = LoraWeights(2.0, {q: torch.zeros(2, 4, 64)}, {q: torch.zeros(2, 64, 4)})  # blocks 0:2, rank 4
    server = start_server(lora_model, (0, 2), limits=HandlerLimits(max_session_lora_bytes=2 * lora.nbytes))
    with RpcClient(server.endpoint) as client:
        opened = [OpenReply.from_wire(client.call(*Open(8, lora=lora).to_wire())).session for _ in range(2)]
        with pytest.raises(ServerBusy, match="LoRAs"):
            client.call(*Open(8, lora=lora).to_wire())
        assert len(server.handler.sessions) == 2
        assert OpenReply.from_wire(client.call(*Open(8).to_wire())).session  # without a LoRA: room as before
        client.call(*Close(opened[0]).to_wire())
        assert OpenReply.from_wire(client.call(*Open(8, lora=lora).to_wire())).session


def test_a_classifier_lora_result_is_served_without_its_head(lora_model, tmp_path):
    """The head of a classifier's LoRA (PEFT's modules_to_save) stays with the client: a server serves the blocks'
    part and leaves the head out."""
    from safetensors import safe_open

    from swarm.core.adapters import read_peft
    from swarm.core.client.lora import HEAD_KEY, new_lora, save_lora
    from swarm.core.server.backend import BlockSpan
    from swarm.core.weights import ModelSource

    span = BlockSpan.load(ModelSource(str(lora_model)), 0, 2, torch.float32)
    lora = new_lora(span.family, span.config, 4, 2, 4.0, ["q_proj"], torch.float32)
    save_lora(tmp_path / "cls", lora, {"weight": torch.ones(2, 64)}, {"task": "classification", "model": "m"},
              span.family, span.config, 64)
    assert json.loads((tmp_path / "cls" / "adapter_config.json").read_text())["modules_to_save"] == ["score"]
    with safe_open(str(tmp_path / "cls" / "adapter_model.safetensors"), "pt") as f:
        assert HEAD_KEY in f.keys()
    task = read_peft(str(tmp_path / "cls"), span.family, span.config, 0, 2, span.linears, span.dtype)
    assert sorted(task.ops) == [(0, "self_attn.q_proj"), (1, "self_attn.q_proj")]
