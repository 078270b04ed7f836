"""Shared fixtures: tiny random models saved as real safetensors checkpoints, and servers on 127.0.0.1 (in process,
as `python -m swarm serve` subprocesses, or as processes forked from a fork server that imported torch once)."""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import multiprocessing.connection
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
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


def make_tokenized_model(path: Path, layers: int = 4, seed: int = 0, **overrides) -> Path:
    """A tiny random Llama with swarm's byte-level tokenizer (and its chat template) saved beside it."""
    from swarm.core.demo import build_demo_tokenizer

    tokenizer = build_demo_tokenizer()
    make_tiny_model(path, layers=layers, vocab=len(tokenizer), seed=seed, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **overrides)
    tokenizer.save_pretrained(path)
    return path


def load_reference(path: Path):
    """The same checkpoint loaded by plain transformers, float32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def reference_answer(path: Path, message: str, max_new_tokens: int) -> str:
    """What plain transformers answers, greedily, to one chat `message` (the checkpoint's chat template)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    out = load_reference(path).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                        do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


_CLIENTS: list = []  # clients made by `client`, closed when their test ends (sockets do not wait for the collector)


def client(path: Path, endpoints: list[str], **kwargs):
    """A distributed causal LM of `path` through `endpoints`, closed when the test that made it ends."""
    from swarm import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=endpoints, **kwargs)
    _CLIENTS.append(model)
    return model


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


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
        kwargs.setdefault("poll_ms", 20)  # the I/O loop sees stop() sooner: a test's servers stop in ~0.1 s
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
    numbers = itertools.count()  # servers may be started from several threads at once

    def start(*args: str) -> ServeProcess:
        proc = ServeProcess(list(args), tmp_path / f"serve-{next(numbers)}.log", swarm_env(tmp_path), 120.0)
        started.append(proc)
        _LIVE.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:  # all stop at once
            if proc.proc.poll() is None:
                proc.proc.send_signal(signal.SIGTERM)
        for proc in started:
            proc.stop()


# swarm commands in processes forked from a server that has imported torch and transformers once: real processes
# (signals, exit codes, their own sockets, stdout and stderr) that start in a fraction of a second instead of several.
# For tests of what servers and commands do; the start-up of `python -m swarm` itself is tested with subprocesses.
_FORKS = multiprocessing.get_context("forkserver")
_FORKS.set_forkserver_preload(["torch", "transformers.models.llama.modeling_llama", "tokenizers", "rich.logging",
                               "rich.live", "swarm.cli.app", "swarm.core.server", "swarm.core.chat", "swarm.core.tune",
                               "swarm.core.bench", "swarm.transport.discovery", "conftest"])


def _die_with_pytest() -> None:
    """SIGKILL this forked process once pytest is gone, even killed (the fork server outlives it while its children
    run, so $SWARM_PARENT_PID would not do)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-pytest", daemon=True).start()


def _run_cli(args: list[str], out_path: str, err_path: str, env: dict[str, str], cwd: str | None) -> None:
    """The forked child: `swarm ARGS` with this environment and directory, stdout and stderr going to files."""
    os.environ.clear()
    os.environ.update(env)
    _die_with_pytest()
    if cwd is not None:
        os.chdir(cwd)
    sys.stdout.flush()
    sys.stderr.flush()
    for path, fd in ((out_path, 1), (err_path, 2)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    from swarm.cli.app import run

    code = run(args)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def fork_swarm(*args: str, env: dict[str, str], cwd: Path | None = None,
               timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """`swarm ARGS` in a forked process, like subprocess.run(capture_output=True, text=True, timeout=...)."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        proc = _FORKS.Process(target=_run_cli, args=(list(args), str(out), str(err), env,
                                                     None if cwd is None else str(cwd)))
        proc.start()
        try:
            proc.join(timeout)
            if proc.is_alive():
                raise subprocess.TimeoutExpired(["swarm", *args], timeout)
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join(10)
        return subprocess.CompletedProcess(["swarm", *args], proc.exitcode, out.read_text() if out.exists() else "",
                                           err.read_text() if err.exists() else "")


class ForkedServe:
    """`swarm serve ARGS` in a forked process; the endpoint it prints is read (bounded)."""

    def __init__(self, args: list[str], out_path: Path, log_path: Path, env: dict[str, str],
                 start_timeout: float = 120.0):
        self.log_path = log_path
        self.proc = _FORKS.Process(target=_run_cli, args=(["serve", *args], str(out_path), str(log_path), env, None))
        self.proc.start()
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline and self.proc.is_alive():
            line = out_path.read_text() if out_path.exists() else ""
            if line.startswith("tcp://") and line.endswith("\n"):
                self.endpoint = line.splitlines()[0].strip()
                return
            time.sleep(0.02)
        code = self.stop(signal.SIGKILL)
        err = log_path.read_text(errors="replace").strip() if log_path.exists() else ""
        raise RuntimeError(f"a forked server did not start within {start_timeout:.0f} s (exit code {code}): "
                           f"{err.splitlines()[-1] if err else 'no output'}")

    def alive(self) -> bool:
        return self.proc.is_alive()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Send `sig` (SIGKILL after `timeout`) and return the exit code."""
        if self.proc.is_alive() and self.proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):  # it may end between the check and the signal
                os.kill(self.proc.pid, sig)
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
        return self.proc.exitcode


_FORKED: list[ForkedServe] = []


@pytest.fixture
def fork_serve(tmp_path) -> Iterator[Callable[..., ForkedServe]]:
    """Like serve_process, but forked: for tests of servers (gossip, recovery, relay), not of the CLI's start-up."""
    started: list[ForkedServe] = []
    numbers = itertools.count()

    def start(*args: str) -> ForkedServe:
        n = next(numbers)
        server = ForkedServe(list(args), tmp_path / f"fork-{n}.out", tmp_path / f"fork-{n}.log", swarm_env(tmp_path))
        started.append(server)
        _FORKED.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:  # all stop at once
            if server.alive() and server.proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(server.proc.pid, signal.SIGTERM)
        for server in started:
            server.stop()


@pytest.fixture(scope="session", autouse=True)
def _kill_leftover_children():
    yield
    for server in _LIVE:
        if server.proc.poll() is None:
            server.stop(signal.SIGKILL)
    for forked in _FORKED:
        if forked.alive():
            forked.stop(signal.SIGKILL)
