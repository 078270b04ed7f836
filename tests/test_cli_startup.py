"""The command line starts fast and fails fast: no torch for `--help`, the port bound before the weights load, one
`error:` line per failure, child servers that die with their parent, and `swarm status` that cuts nothing short."""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import make_tiny_model, swarm_env

ROOT = Path(__file__).resolve().parent.parent


def run_swarm(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "swarm", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one non-empty stderr line of a failed command (the test fails when there are more)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("startup") / "llama", layers=2)


def test_help_version_completions_and_usage_errors_import_no_torch(tmp_path):
    """Deterministic stand-in for "fast": what runs before a command starts must not import torch or transformers."""
    code = textwrap.dedent("""
        import contextlib, io, json, sys
        from swarm.cli.app import run
        codes = {}
        for args in (["--help"], [], ["--version"], ["serve", "--help"], ["chat", "--help"], ["status", "--help"],
                     ["bench", "--help"], ["tune", "--help"], ["completions", "fish"], ["serve", "--bogus"],
                     ["serve"], ["status", "--wait", "x"]):
            with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
                codes[" ".join(args)] = [run(args), out.getvalue(), err.getvalue()]
        heavy = sorted(m for m in ("torch", "transformers", "zmq") if m in sys.modules)
        print(json.dumps({"codes": codes, "heavy": heavy}))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=swarm_env(tmp_path),
                            timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["heavy"] == []
    codes = data["codes"]
    for args in ("--help", "", "serve --help", "chat --help", "completions fish"):
        assert codes[args][0] == 0, (args, codes[args])
    assert "Usage" in codes[""][1] and "--blocks" in codes["serve --help"][1]
    assert codes["--version"][:2] == [0, "swarm 0.1.0\n"]
    for args in ("serve --bogus", "serve", "status --wait x"):
        exit_code, out, err = codes[args]
        assert exit_code == 2 and out == "", (args, codes[args])
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), (args, err)
    assert "--bogus" in codes["serve --bogus"][2] and "--wait" in codes["status --wait x"][2]


def test_flags_take_no_value_in_help(tmp_path):
    result = run_swarm("status", "--help", env={**swarm_env(tmp_path), "COLUMNS": "100"})
    assert result.returncode == 0
    assert "<bool>" not in result.stdout and "--json" in result.stdout


def test_serve_fails_at_once_on_a_port_in_use(model_dir, tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = run_swarm("serve", str(model_dir), "--blocks", "0:2", "--host", "127.0.0.1", "--port", str(port),
                           "--no-mdns", env=swarm_env(tmp_path))
    assert result.returncode == 1, result.stderr
    line = error_line(result)  # one line: nothing was loaded or logged before it
    assert f"cannot listen on tcp://127.0.0.1:{port}: address in use" in line


def test_serve_fails_at_once_on_a_bad_host(model_dir, tmp_path):
    result = run_swarm("serve", str(model_dir), "--blocks", "0:2", "--host", "999.1.1.1", "--no-mdns",
                       env=swarm_env(tmp_path))
    assert result.returncode == 1, result.stderr
    assert "cannot listen on tcp://999.1.1.1:" in error_line(result)


def test_status_never_cuts_addresses_or_model_names(model_dir, serve_process, tmp_path):
    long_id = "an-unusually-long-model-name-that-would-never-fit-in-a-narrow-table-0123456789"
    server = serve_process(str(model_dir), "--blocks", "0:2", "--host", "127.0.0.1", "--no-mdns",
                           "--model-id", long_id, "--gossip-period", "0.2", "--record-ttl", "5")
    env = {**swarm_env(tmp_path), "COLUMNS": "80"}
    result = run_swarm("status", "--initial-peers", server.endpoint, "--wait", "1", env=env)
    assert result.returncode == 0, result.stderr
    assert long_id in result.stderr and server.endpoint in result.stderr
    assert "…" not in result.stderr


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie left for a parent that does not reap counts as gone)."""
    if Path("/proc/self/stat").exists():
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


PARENT = """
import sys, threading
from swarm.core.local_swarm import LocalSwarm

def start():
    global swarm
    swarm = LocalSwarm(sys.argv[1], [(0, 1), (1, 2)], extra_args=["--no-mdns", "--log-level", "warning"]).start()

if sys.argv[2] == "thread":  # started by a thread that ends: only the watchdog in `swarm serve` can follow us
    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
else:
    start()
print(" ".join(str(server.proc.pid) for server in swarm.servers), flush=True)
threading.Event().wait(300)
"""


@pytest.mark.parametrize("started_by", ["main", "thread"])
def test_local_servers_die_with_their_parent(model_dir, tmp_path, started_by):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(model_dir), started_by], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=swarm_env(tmp_path))
    children: list[int] = []
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(parent.stdout, selectors.EVENT_READ)
            assert sel.select(timeout=180), "the parent did not start its local swarm in time"
        line = parent.stdout.readline()
        children = [int(pid) for pid in line.split()]
        assert len(children) == 2, (line, parent.stderr.read() if parent.poll() is not None else "")
        assert all(_alive(pid) for pid in children)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in children), "a server outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        for stream in (parent.stdout, parent.stderr):
            if stream is not None:
                stream.close()
