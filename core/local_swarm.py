"""A swarm of `swarm serve` subprocesses on this machine (the built-in default, benchmarks, tests).

`LocalSwarm(model, spans)` starts one server per span on 127.0.0.1 with any free port, waits (bounded) for each to
print its endpoint, and stops every process by its PID on exit (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import subprocess
import sys
import tempfile
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


class LocalSwarm:
    def __init__(self, model: str | Path, spans: Sequence[tuple[int, int]], extra_args: Sequence[str] = (),
                 start_timeout: float = 180.0, env: dict[str, str] | None = None):
        self.model, self.spans = str(model), list(spans)
        self.extra_args, self.start_timeout = list(extra_args), start_timeout
        self.env = env
        self.processes: list[subprocess.Popen[str]] = []
        self.endpoints: list[str] = []
        self.logs: list[Path] = []  # each server's stderr (a pipe nobody reads could fill up and stall it)
        self._log_dir: tempfile.TemporaryDirectory[str] | None = None

    def start(self) -> LocalSwarm:
        try:
            self._log_dir = tempfile.TemporaryDirectory(prefix="swarm-local-")
            for start, end in self.spans:
                cmd = [sys.executable, "-m", "swarm", "serve", self.model, "--blocks", f"{start}:{end}",
                       "--host", "127.0.0.1", "--port", "0", *self.extra_args]
                env = dict(self.env if self.env is not None else os.environ)
                env.setdefault("PYTHONUNBUFFERED", "1")
                log_path = Path(self._log_dir.name) / f"server-{start}-{end}.log"
                with open(log_path, "w") as log_file:
                    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True, env=env)
                self.processes.append(proc)
                self.logs.append(log_path)
            self.endpoints = [self._endpoint(p, path) for p, path in zip(self.processes, self.logs, strict=True)]
        except BaseException:
            self.stop()
            raise
        log.info("local swarm: %s", ", ".join(f"{a}:{b} at {e}" for (a, b), e in zip(self.spans, self.endpoints,
                                                                                       strict=True)))
        return self

    def _endpoint(self, proc: subprocess.Popen[str], log_path: Path) -> str:
        assert proc.stdout is not None  # noqa: S101 - set by Popen(stdout=PIPE)
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + self.start_timeout
        try:
            while time.monotonic() < deadline:
                if sel.select(timeout=0.2):
                    line = proc.stdout.readline()
                    if line.startswith("tcp://"):
                        return line.strip()
                    if not line and proc.poll() is not None:
                        break
                elif proc.poll() is not None:
                    break
        finally:
            sel.close()
        err = log_path.read_text(errors="replace")
        last = err.strip().splitlines()[-1] if err.strip() else "no output"
        raise SwarmError(f"a local server did not start within {self.start_timeout:.0f} s: {last}")

    def stop(self, grace: float = 15.0) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.processes:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()
        self.processes = []
        if self._log_dir is not None:
            self._log_dir.cleanup()
            self._log_dir = None

    def __enter__(self) -> LocalSwarm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
