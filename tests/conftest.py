"""Shared fixtures: tiny random models saved as real safetensors checkpoints, and servers on 127.0.0.1."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# mDNS stays off unless a test turns it on, and then only on loopback: never multicast on other interfaces
os.environ["SWARM_MDNS"] = "0"
os.environ["SWARM_MDNS_INTERFACE"] = "127.0.0.1"

from swarm.core.local_swarm import ServeProcess  # noqa: E402
from swarm.core.server import Server, ServerConfig  # noqa: E402
from swarm.core.server.handler import HandlerLimits  # noqa: E402

torch.set_num_threads(2)


def make_tiny_model(path: Path, family: str = "llama", layers: int = 4, hidden: int = 64, seed: int = 0,
                    vocab: int = 128, **overrides) -> Path:
    """Save a tiny random causal LM of `family` (llama, mistral, qwen2) to `path` and return it."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_cls, model_cls = classes[family]
    kwargs = dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=False)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    model.save_pretrained(path)
    return path


def make_tokenized_model(path: Path, layers: int = 4, seed: int = 0) -> Path:
    """A tiny random Llama with swarm's byte-level tokenizer (and its chat template) saved beside it."""
    from swarm.core.demo import build_demo_tokenizer

    tokenizer = build_demo_tokenizer()
    make_tiny_model(path, layers=layers, vocab=len(tokenizer), seed=seed, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    tokenizer.save_pretrained(path)
    return path


def load_reference(path: Path):
    """The same checkpoint loaded by plain transformers, float32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "llama", layers=6)


@pytest.fixture(scope="session")
def tiny_llama_ref(tiny_llama):
    return load_reference(tiny_llama)


@pytest.fixture
def start_server() -> Iterator[Callable[..., Server]]:
    """Start in-process servers on 127.0.0.1 (any free port); all are stopped at the end of the test."""
    servers: list[Server] = []

    def start(model: Path, blocks: tuple[int, int], **kwargs) -> Server:
        limits = kwargs.pop("limits", HandlerLimits())
        server = Server(ServerConfig(str(model), blocks, host="127.0.0.1", port=0, limits=limits, **kwargs))
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def llama_swarm(tiny_llama) -> Iterator[list[str]]:
    """Three servers covering the 6 blocks of tiny_llama (0:2, 2:4, 4:6), shared by read-only tests."""
    servers = [Server(ServerConfig(str(tiny_llama), span, host="127.0.0.1")).start()
               for span in ((0, 2), (2, 4), (4, 6))]
    try:
        yield [s.endpoint for s in servers]
    finally:
        for server in servers:
            server.stop()


def swarm_env(tmp_path: Path) -> dict[str, str]:
    """Environment for subprocesses: offline, quiet, cache under tmp_path."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", SWARM_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1",
               TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false", SWARM_MDNS="0",
               SWARM_MDNS_INTERFACE="127.0.0.1")
    return env


_LIVE: list[ServeProcess] = []


@pytest.fixture
def serve_process(tmp_path) -> Iterator[Callable[..., ServeProcess]]:
    started: list[ServeProcess] = []

    def start(*args: str) -> ServeProcess:
        proc = ServeProcess(list(args), tmp_path / f"serve-{len(started)}.log", swarm_env(tmp_path), 120.0)
        started.append(proc)
        _LIVE.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()


@pytest.fixture(scope="session", autouse=True)
def _kill_leftover_children():
    yield
    for server in _LIVE:
        if server.proc.poll() is None:
            server.stop(signal.SIGKILL)
