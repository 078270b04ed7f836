"""Partial loading: a server holds only the blocks it serves, from single-file or sharded safetensors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_reference, make_tiny_model

from swarm.core.server.backend import BlockSpan
from swarm.core.weights import ModelSource, resolve_dtype
from swarm.transport.errors import ConfigError


@pytest.fixture(scope="module")
def eight_blocks(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "eight", layers=8, seed=1)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "sharded"
    torch.manual_seed(2)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path, max_shard_size="60KB")
    return path


def test_server_of_two_blocks_holds_only_them(eight_blocks):
    source = ModelSource(eight_blocks)
    span = BlockSpan.load(source, 0, 2, torch.float32)
    names = set(span.state_dict().keys())
    assert names and all(n.startswith(("blocks.0.", "blocks.1.")) for n in names)
    ref = load_reference(eight_blocks)
    per_block = sum(p.numel() for p in ref.model.layers[0].parameters())
    assert sum(p.numel() for p in span.parameters()) == 2 * per_block
    # the weights are the checkpoint's, not a random init
    torch.testing.assert_close(span.blocks[1].mlp.up_proj.weight, ref.model.layers[1].mlp.up_proj.weight)
    assert not any(p.requires_grad for p in span.parameters())


def test_loader_reads_only_requested_tensors(eight_blocks):
    source = ModelSource(eight_blocks)
    tensors = source.load_tensors(["model.layers.2.", "model.layers.3."])
    assert tensors and all(k.startswith(("model.layers.2.", "model.layers.3.")) for k in tensors)
    assert not any("embed_tokens" in k or "lm_head" in k for k in tensors)
    assert "model.layers.20.self_attn.q_proj.weight" not in tensors


def test_sharded_checkpoint_opens_only_needed_shards(sharded, monkeypatch):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2  # the fixture really is sharded
    opened: list[str] = []
    import swarm.core.weights as weights

    real_open = weights.safe_open

    def tracking_open(path, *args, **kwargs):
        opened.append(str(path).rsplit("/", 1)[-1])
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(weights, "safe_open", tracking_open)
    span = BlockSpan.load(ModelSource(sharded), 6, 8, torch.float32)
    needed = {f for k, f in index["weight_map"].items() if k.startswith(("model.layers.6.", "model.layers.7."))}
    assert set(opened) == needed
    assert needed != shards

    ref = load_reference(sharded)
    hidden = torch.randn(1, 5, 64)
    with torch.no_grad():
        expected = hidden
        pos = torch.arange(5)[None]
        emb = ref.model.rotary_emb(hidden, pos)
        for layer in ref.model.layers[6:8]:
            expected = layer(expected, attention_mask=None, position_ids=pos, position_embeddings=emb)
        got = span(hidden)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_dtype_resolution():
    assert resolve_dtype("bfloat16") == torch.bfloat16
    assert resolve_dtype("float32") == torch.float32
    with pytest.raises(ConfigError, match="unknown dtype"):
        resolve_dtype("int3")


def test_bad_model_paths(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        ModelSource(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        ModelSource(str(tmp_path / "empty")).config()


def test_span_outside_model_is_refused(eight_blocks):
    with pytest.raises(ConfigError, match="outside the model's 8 blocks"):
        BlockSpan.load(ModelSource(eight_blocks), 6, 9, torch.float32)


def test_checkpoint_missing_a_block_tensor(tmp_path, eight_blocks):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((eight_blocks / "config.json").read_text())
    tensors = load_file(eight_blocks / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ConfigError, match="lacks tensors of block 1: mlp.up_proj.weight"):
        BlockSpan.load(ModelSource(broken), 0, 2, torch.float32)


def test_config_copies_leave_the_config_as_read(eight_blocks):
    source = ModelSource(eight_blocks)
    half = source.config("bfloat16")
    assert half.dtype == torch.bfloat16
    assert source.config().dtype == torch.float32 and half.dtype == torch.bfloat16  # the first copy is untouched
    half.num_hidden_layers = 99
    assert source.config().num_hidden_layers == 8
    span = BlockSpan.load(source, 0, 1, torch.bfloat16)
    assert span.config.dtype == torch.bfloat16 and span.blocks[0].mlp.up_proj.weight.dtype == torch.bfloat16
