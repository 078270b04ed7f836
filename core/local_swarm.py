"""A swarm of `swarm serve` subprocesses on this machine (the built-in default, benchmarks, tests).

`LocalSwarm(model, spans)` starts one server per span on 127.0.0.1 with any free port, waits (bounded) for each to
print its endpoint, and stops every process by its PID on exit (SIGTERM, then SIGKILL after a grace period).
The servers also die with this process when it is killed outright (`$SWARM_PARENT_PID`, see `swarm serve`).
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from ..transport.errors import SwarmError

log = logging.getLogger(__name__)


def even_spans(num_blocks: int, servers: int) -> list[tuple[int, int]]:
    """Split [0, num_blocks) into `servers` contiguous spans of near-equal size."""
    if not 1 <= servers <= num_blocks:
        raise SwarmError(f"cannot split {num_blocks} blocks over {servers} servers")
    bounds = [round(i * num_blocks / servers) for i in range(servers + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


class ServeProcess:
    """One `swarm serve ARGS` subprocess: stderr goes to `log_path`, the endpoint it prints is read (bounded)."""

    def __init__(self, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                 start_timeout: float = 180.0):
        env = dict(env if env is not None else os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # die with this process: the server watches this pid, and on Linux asks for SIGTERM when its parent goes,
        # which the kernel ties to the thread starting it: only safe from the main thread, which lives as long
        env["SWARM_PARENT_PID"] = str(os.getpid())
        env["SWARM_PARENT_DEATHSIG"] = "1" if threading.current_thread() is threading.main_thread() else "0"
        self.log_path = log_path
        with open(log_path, "w") as log_file:
            # a session of its own: Ctrl-C in the terminal (SIGINT to the foreground process group) is for the
            # parent, which stops an answer or stops its servers itself; it must not kill the servers under it
            self.proc = subprocess.Popen([sys.executable, "-m", "swarm", "serve", *args], stdout=subprocess.PIPE,
                                         stderr=log_file, stdin=subprocess.DEVNULL, text=True, env=env,
                                         start_new_session=True)
        try:
            self.endpoint = self._read_endpoint(start_timeout)
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def _read_endpoint(self, timeout: float) -> str:
        stdout = self.proc.stdout
        if stdout is None:
            raise SwarmError("the server's stdout is not a pipe")
        sel = selectors.DefaultSelector()
        sel.register(stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if sel.select(timeout=0.2):
                    line = stdout.readline()
                    if line.startswith("tcp://"):
                        return line.strip()
                    if not line and self.proc.poll() is not None:
                        break
                elif self.proc.poll() is not None:
                    break
        finally:
            sel.close()
        err = self.log_path.read_text(errors="replace").strip()
        last = err.splitlines()[-1] if err else "no output"
        raise SwarmError(f"a local server did not start within {timeout:.0f} s: {last}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send `sig` (SIGKILL after `timeout`) and return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code


class LocalSwarm:
    def __init__(self, model: str | Path, spans: Sequence[tuple[int, int]], extra_args: Sequence[str] = (),
                 start_timeout: float = 180.0, env: dict[str, str] | None = None):
        self.model, self.spans = str(model), list(spans)
        self.extra_args, self.start_timeout = list(extra_args), start_timeout
        self.env = env
        self.servers: list[ServeProcess] = []
        self.endpoints: list[str] = []
        self._log_dir: tempfile.TemporaryDirectory[str] | None = None

    def start(self) -> LocalSwarm:
        try:
            self._log_dir = tempfile.TemporaryDirectory(prefix="swarm-local-")
            for start, end in self.spans:
                args = [self.model, "--blocks", f"{start}:{end}", "--host", "127.0.0.1", "--port", "0",
                        *self.extra_args]
                log_path = Path(self._log_dir.name) / f"server-{start}-{end}.log"
                self.servers.append(ServeProcess(args, log_path, self.env, self.start_timeout))
            self.endpoints = [server.endpoint for server in self.servers]
        except BaseException:
            self.stop()
            raise
        log.info("local swarm: %s", ", ".join(f"{a}:{b} at {e}" for (a, b), e in zip(self.spans, self.endpoints,
                                                                                       strict=True)))
        return self

    def stop(self, grace: float = 15.0) -> None:
        for server in self.servers:  # signal all first, so they shut down in parallel
            if server.proc.poll() is None:
                server.proc.send_signal(signal.SIGTERM)
        for server in self.servers:
            server.stop(signal.SIGTERM, grace)
        self.servers = []
        if self._log_dir is not None:
            self._log_dir.cleanup()
            self._log_dir = None

    def __enter__(self) -> LocalSwarm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
