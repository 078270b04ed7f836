"""The command line end to end: subprocess servers, `swarm chat --prompt`, errors, exit codes, completions."""

from __future__ import annotations

import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import make_tokenized_model, reference_answer, swarm_env

ROOT = Path(__file__).resolve().parent.parent


def run_swarm(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "swarm", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """A tiny random Llama with swarm's byte-level tokenizer and its chat template."""
    return make_tokenized_model(tmp_path_factory.mktemp("chat") / "llama", layers=4, seed=5)


@pytest.mark.slow
def test_chat_prompt_through_subprocess_servers(chat_model, serve_process, tmp_path):
    with ThreadPoolExecutor(2) as pool:  # both start at once
        a, b = pool.map(lambda args: serve_process(str(chat_model), *args),
                        [("--blocks", "0:2", "--host", "127.0.0.1", "--port", "0"),
                         ("--blocks", "2:4", "--host", "127.0.0.1")])
    result = run_swarm("chat", str(chat_model), "--initial-peers", a.endpoint, b.endpoint, "--prompt",
                       "Hello, swarm!", "--temperature", "0", "--max-new-tokens", "12", "--show-route",
                       env=swarm_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert f"route: {a.endpoint}[0:2] -> {b.endpoint}[2:4]" in result.stderr
    assert result.stdout == reference_answer(chat_model, "Hello, swarm!", 12) + "\n"


@pytest.mark.slow
def test_serve_stops_cleanly_on_sigterm_and_sigint(chat_model, serve_process):
    with ThreadPoolExecutor(2) as pool:  # both start at once
        first, second = pool.map(lambda _: serve_process(str(chat_model), "--blocks", "0:4", "--host", "127.0.0.1"),
                                 range(2))
    assert first.stop(signal.SIGTERM) == 0
    assert second.stop(signal.SIGINT) == 130


@pytest.mark.parametrize("args,message,code", [
    (["serve", "MODEL", "--blocks", "3-5"], "--blocks must be START:END", 2),
    (["serve", "MODEL", "--blocks", "5:3"], "START must be smaller than END", 2),
    (["serve", "MODEL", "--blocks", "0:99"], "outside the model's 4 blocks", 2),
    (["serve", "/no/such/model", "--blocks", "0:2"], "not a directory with a model", 1),
    (["serve", "MODEL", "--blocks", "0:2", "--dtype", "int3"], "unknown dtype 'int3'", 1),
    (["serve", "MODEL", "--blocks", "0:2", "--device", "tpu"], "unknown device 'tpu'", 1),
    (["serve", "MODEL", "--blocks", "0:2", "--device", "cuda:1"], "torch sees no CUDA GPU", 1),
    (["chat", "MODEL", "--device", "cuda", "--prompt", "hi"], "torch sees no CUDA GPU", 1),
    (["chat", "MODEL", "--initial-peers", "tcp://127.0.0.1:1", "--prompt", "hi"], "found no server", 1),
    (["chat", "MODEL", "--initial-peers", "not-an-address:x", "--prompt", "hi"], "bad peer address", 1),
    (["chat", "MODEL", "--prompt", "hi"], "found no server", 1),
    (["serve", "MODEL", "--blocks", "0:2", "--bogus"], "No such option: --bogus", 2),
    (["serve", "--blocks", "0:2"], "Missing argument", 2),
    (["serve", "MODEL", "--blocks", "0:2", "--port", "abc"], "Invalid value for '--port'", 2),
    (["status", "--json", "true", "--wait", "0"], "found no server of 'true'", 1),
    (["status", "--initial-peers", "tcp://127.0.0.1:1", "--wait", "0.5"], "searched tcp://127.0.0.1:1", 1),
    (["bench", "--initial-peers", "tcp://127.0.0.1:1", "--wait", "0.5"], "searched tcp://127.0.0.1:1", 1),
])
def test_cli_errors_are_one_clear_line(chat_model, tmp_path, args, message, code):
    args = [str(chat_model) if a == "MODEL" else a for a in args]
    env = swarm_env(tmp_path)
    result = run_swarm(*args, env=env)
    assert result.returncode == code
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in result.stderr


def test_demo_chat_on_a_fresh_machine(tmp_path):
    """`swarm chat --demo random --prompt` with no model and no peers: builds the random demo model, runs a local
    swarm, answers (the real default demo is tested in test_real_model.py)."""
    env = swarm_env(tmp_path)
    result = run_swarm("chat", "--demo", "random", "--prompt", "hi", "--max-new-tokens", "8", "--seed", "0", env=env,
                       timeout=300)
    assert result.returncode == 0, result.stderr
    assert "random" in result.stderr and "swarm chat MODEL --initial-peers" in result.stderr
    assert result.stdout.endswith("\n") and len(result.stdout) > 1
    assert list((tmp_path / "cache").glob("swarm-demo-llama-v*/model.safetensors"))


def test_completions_are_fresh():
    from swarm.cli.app import app
    from swarm.cli.completions import script

    files = {"bash": "swarm.bash", "zsh": "_swarm", "fish": "swarm.fish"}
    for shell, name in files.items():
        stored = (ROOT / "completions" / name).read_text()
        assert stored == script(app, shell), (f"completions/{name} is stale: run "
                                              "`python -m swarm completions --write completions`")
    assert "--blocks" in script(app, "bash") and "-l initial-peers" in script(app, "fish")


def test_help_and_version_of_commands(tmp_path):
    env = swarm_env(tmp_path)
    result = run_swarm("serve", "--help", env=env)
    assert result.returncode == 0 and "--blocks" in result.stdout and "--cache-tokens" in result.stdout
    result = run_swarm("chat", "--help", env=env)
    assert result.returncode == 0 and "--max-new-tokens" in result.stdout and "--top-p" in result.stdout
