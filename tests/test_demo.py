"""Tests for swarm.core.demo: the offline, deterministic demo Llama model."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from jinja2.exceptions import TemplateError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm.core import demo
from swarm.transport.errors import ConfigError

TEXTS = ["hello world", "héllo wörld ✓ 你好", "", "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\n"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return demo.ensure_demo_model(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


@pytest.fixture(scope="module")
def model(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()


def test_default_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("SWARM_CACHE_DIR")
    assert demo.default_cache_dir() == tmp_path / "xdg" / "swarm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.default_cache_dir() == tmp_path / "home" / ".cache" / "swarm"


def test_default_cache_dir_used_when_none_given(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path))
    path = demo.ensure_demo_model()
    assert path.parent == tmp_path
    assert demo.is_demo_model(path)


def test_model_dir_layout_and_marker(model_dir: Path) -> None:
    assert model_dir.is_dir()
    assert demo.DEMO_MODEL_NAME in model_dir.name
    assert f"v{demo.DEMO_MODEL_VERSION}" in model_dir.name
    assert demo.is_demo_model(model_dir)
    assert (model_dir / "model.safetensors").is_file()
    assert not list(model_dir.glob("*.bin")), "weights must be safetensors only"
    assert (model_dir / "config.json").is_file()
    assert (model_dir / "tokenizer.json").is_file()
    marker = json.loads((model_dir / demo.MARKER_FILE).read_text(encoding="utf-8"))
    assert marker["version"] == demo.DEMO_MODEL_VERSION
    assert marker["random_weights"] is True
    assert "random" in marker["note"].lower()
    # No temporary build directories left behind next to it.
    assert sorted(p.name for p in model_dir.parent.iterdir()) == [model_dir.name]


def test_is_demo_model_false_for_other_dirs(tmp_path: Path) -> None:
    assert not demo.is_demo_model(tmp_path)
    assert not demo.is_demo_model(tmp_path / "missing")


def test_model_architecture_and_sizes(model, tokenizer, model_dir: Path) -> None:
    assert type(model).__name__ == "LlamaForCausalLM"
    cfg = model.config
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert cfg.model_type == "llama"
    assert cfg.hidden_size == 256
    assert cfg.intermediate_size == 688
    assert cfg.num_hidden_layers == 8
    assert cfg.num_attention_heads == 8
    assert cfg.num_key_value_heads == 4
    assert cfg.max_position_embeddings == 2048
    assert cfg.vocab_size == len(tokenizer)
    assert cfg.tie_word_embeddings is False
    assert cfg.bos_token_id == tokenizer.bos_token_id == tokenizer.convert_tokens_to_ids("<s>")
    assert cfg.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("</s>")
    assert cfg.pad_token_id == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<pad>")
    assert model.dtype == torch.float32

    tensors = load_file(model_dir / "model.safetensors")
    assert set(tensors) == set(model.state_dict())
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert tensors["model.embed_tokens.weight"].shape == (len(tokenizer), 256)
    assert tensors["lm_head.weight"].shape == (len(tokenizer), 256)
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (4 * 32, 256)
    assert tensors["model.layers.7.mlp.gate_proj.weight"].shape == (688, 256)
    # Untied and actually random (not zeros, not the same tensor twice).
    assert not torch.equal(tensors["model.embed_tokens.weight"], tensors["lm_head.weight"])
    assert tensors["model.layers.0.mlp.up_proj.weight"].std() > 0.01
    assert torch.equal(tensors["model.norm.weight"], torch.ones(256))


def test_weights_are_deterministic(model_dir: Path, tmp_path: Path) -> None:
    rng_before = torch.get_rng_state()
    other = demo.ensure_demo_model(tmp_path / "other-cache")
    assert torch.equal(torch.get_rng_state(), rng_before), "building must not disturb the global torch RNG"
    assert other != model_dir
    a = load_file(model_dir / "model.safetensors")
    b = load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (model_dir / "model.safetensors").read_bytes() == (other / "model.safetensors").read_bytes()
    assert (model_dir / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()


def test_second_call_reuses_existing_dir(tmp_path: Path) -> None:
    first = demo.ensure_demo_model(tmp_path)
    weights = first / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    sentinel = first / "sentinel.txt"
    sentinel.write_text("keep me")
    second = demo.ensure_demo_model(tmp_path)
    assert second == first
    assert sentinel.read_text() == "keep me"
    assert weights.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]


def test_foreign_dir_in_the_way_is_not_overwritten(tmp_path: Path) -> None:
    target = demo.demo_model_dir(tmp_path)
    target.mkdir(parents=True)
    (target / "precious.txt").write_text("user data")
    with pytest.raises(ConfigError, match="not a swarm demo model"):
        demo.ensure_demo_model(tmp_path)
    assert (target / "precious.txt").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_concurrent_builders_agree(tmp_path: Path, model_dir: Path) -> None:
    n = 4
    barrier = threading.Barrier(n)
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        barrier.wait()
        try:
            results.append(demo.ensure_demo_model(tmp_path))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(results) == n
    assert len(set(results)) == 1
    path = results[0]
    assert demo.is_demo_model(path)
    # Only the final directory remains; the losers' temporary copies were removed.
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert (path / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trip(tokenizer, text: str) -> None:
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Byte-level: one token per UTF-8 byte, id == byte value.
    assert ids[1:] == list(text.encode("utf-8"))


def test_tokenizer_covers_all_bytes(tokenizer) -> None:
    assert len(tokenizer) == 256 + len(demo.SPECIAL_TOKENS)
    tokens = tokenizer.convert_ids_to_tokens(list(range(256)))
    assert len(set(tokens)) == 256
    for b in range(128):
        assert tokenizer.decode([b]) == chr(b)
    for special in demo.SPECIAL_TOKENS:
        assert tokenizer.convert_tokens_to_ids(special) >= 256


def test_in_memory_tokenizer_matches_saved(tokenizer) -> None:
    fresh = demo.build_demo_tokenizer()
    for text in TEXTS:
        assert fresh(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_chat_template(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "héllo?"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "again"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<s><|system|>\nYou are terse.</s>\n")
    assert "<|user|>\nhéllo?</s>\n" in text
    assert text.endswith("<|user|>\nagain</s>\n<|assistant|>\n")

    no_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert not no_prompt.endswith("<|assistant|>\n")
    assert no_prompt + "<|assistant|>\n" == text

    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    # transformers 5 returns a BatchEncoding here; older releases returned the id list.
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    assert ids[-2:] == [tokenizer.convert_tokens_to_ids("<|assistant|>"), ord("\n")]
    assert tokenizer.decode(ids) == text

    with pytest.raises(TemplateError, match="Unsupported chat role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_greedy_generate(model, tokenizer) -> None:
    enc = tokenizer(["héllo wörld"], return_tensors="pt")
    prompt_len = enc["input_ids"].shape[1]
    with torch.no_grad():
        out1 = model.generate(**enc, max_new_tokens=8, do_sample=False)
        out2 = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert torch.equal(out1, out2), "greedy decoding must be deterministic"
    assert torch.equal(out1[0, :prompt_len], enc["input_ids"][0])
    new = out1[0, prompt_len:]
    assert 1 <= new.numel() <= 8
    assert int(new.min()) >= 0 and int(new.max()) < len(tokenizer)
    logits = model(**enc).logits
    assert logits.shape == (1, prompt_len, len(tokenizer))
    assert torch.isfinite(logits).all()
