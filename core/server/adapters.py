"""The adapters a server holds: loaded at start (`--adapters`), or on first request from a directory (`--adapter-dir`),
at most `max_adapters` of them within `max_bytes`, the least recently used dropped first (LoRAX-style).

Each adapter holds only the tensors of this server's blocks, checked against them when it is read (core/adapters.py:
`read_peft`); a LoRA's go into the span's per-layer pools, so that a pass mixing several LoRAs runs them together.
Sessions hold the adapter they opened with, and requests theirs until they are answered (`get(...,
hold=True)`/`release`), so an adapter in use is never dropped; adapters given with `--adapters` are never dropped
either. Loading runs on a thread of its own, never on the I/O thread: a request for an adapter that is still loading
waits for it (bounded by the load), and two requests for one adapter load it once.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...transport.errors import ConfigError
from ..adapters import NAME, PEFT_CONFIG, Task, adapter_name, read_peft
from .backend import BlockSpan
from .engine import Refused

log = logging.getLogger(__name__)

MAX_LISTED = 64  # adapter names one directory scan lists
SCAN_EVERY = 5.0  # seconds between scans of the adapter directory


@dataclass(frozen=True)
class AdapterConfig:
    preload: tuple[str, ...] = ()  # adapters (hub ids or directories) loaded at start and kept
    directory: str | None = None  # adapters found here (DIR/NAME) are loaded on first request
    max_adapters: int = 16  # adapters held at once
    max_bytes: int = 1 << 30  # bytes of adapter weights held at once


class AdapterStore:
    """The adapters of one BlockSpan, by name."""

    def __init__(self, span: BlockSpan, config: AdapterConfig | None = None):
        self.span, self.config = span, config or AdapterConfig()
        if self.config.max_adapters < len(self.config.preload) or self.config.max_adapters < 0:
            raise ConfigError(f"--max-adapters {self.config.max_adapters} is fewer than the "
                              f"{len(self.config.preload)} adapters given with --adapters")
        self.directory = None if self.config.directory is None else Path(self.config.directory).expanduser()
        if self.directory is not None and not self.directory.is_dir():
            raise ConfigError(f"--adapter-dir {self.directory} is not a directory")
        self._loaded: OrderedDict[str, Task] = OrderedDict()  # least recently used first
        self._pinned: set[str] = set()
        self._users: dict[str, int] = {}
        self._loading: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swarm-adapters")
        self._listed: list[str] = []
        self._scanned = 0.0
        self.preloaded = [adapter_name(source) for source in self.config.preload]  # their names, kept first
        self.loads = 0  # adapters read from disk so far
        self.evictions = 0

    def load_preloaded(self) -> None:
        """Read the `--adapters` ones (a ConfigError names what is wrong with any of them)."""
        for source, name in zip(self.config.preload, self.preloaded, strict=True):
            if name in self._loaded:
                raise ConfigError(f"two adapters are named {name!r}; adapters are chosen by name")
            task = self._read(source)
            with self._lock:
                self._loaded[name] = task
                self._pinned.add(name)
            log.info("adapter %s: %s, %d bytes for blocks %d:%d", name, task.kind, task.nbytes, self.span.start,
                     self.span.end)
        trim_heap()
        if sum(t.nbytes for t in self._loaded.values()) > self.config.max_bytes:
            raise ConfigError(f"the adapters given with --adapters take more than the {self.config.max_bytes} "
                              "bytes of --adapter-memory")

    def _read(self, source: str) -> Task:
        span = self.span
        return read_peft(source, span.family, span.config, span.start, span.end, span.linears, span.dtype,
                         self.config.max_bytes, span.lora_pool).to(span.device)

    # --- what the record announces ------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The adapters this server holds or can load: the ones given at start, those loaded, those in its
        directory (listed again every few seconds)."""
        with self._lock:
            names = list(dict.fromkeys([*self.preloaded, *self._loaded]))
        return list(dict.fromkeys([*names, *self._scan()]))

    def _scan(self) -> list[str]:
        if self.directory is None:
            return []
        now = time.monotonic()
        if now - self._scanned >= SCAN_EVERY:
            self._scanned = now
            found: list[str] = []
            try:
                for entry in sorted(self.directory.iterdir())[:4 * MAX_LISTED]:
                    if (entry / PEFT_CONFIG).is_file() and NAME.fullmatch(entry.name):
                        found.append(entry.name)
            except OSError as e:
                log.warning("cannot list --adapter-dir %s: %s", self.directory, e)
            self._listed = found[:MAX_LISTED]
        return self._listed

    def stats(self) -> dict[str, Any]:
        with self._lock:
            loaded = {name: task.nbytes for name, task in self._loaded.items()}
            users = dict(self._users)
        return {"loaded": [{"name": n, "bytes": b, "sessions": users.get(n, 0)} for n, b in loaded.items()],
                "bytes": sum(loaded.values()), "max_adapters": self.config.max_adapters,
                "max_bytes": self.config.max_bytes, "loads": self.loads, "evictions": self.evictions}

    # --- using them ---------------------------------------------------------------------------------------------

    def get(self, name: str, then: Callable[[Task | None, Refused | None], None], hold: bool = False) -> None:
        """Call `then(task, None)` with adapter `name` (at once when it is loaded, else from the loading thread once
        it is), or `then(None, error)`. With `hold`, the adapter stays loaded until `release(name)`. Raises Refused
        (unknown_adapter) at once for an adapter this server neither holds nor can load."""
        source: Path | None = None
        for _ in range(2):  # loaded, loading, or to load: decided under the lock, so an adapter loads once
            with self._lock:
                task = self._loaded.get(name)
                future = None if task is not None else self._loading.get(name)
                if task is not None:
                    self._loaded.move_to_end(name)
                    if hold:
                        self._users[name] = self._users.get(name, 0) + 1
                elif future is None and source is not None:
                    future = self._loading[name] = self._pool.submit(self._load, name, source)
            if task is not None:
                then(task, None)
                return
            if future is not None:
                break
            source = self._source(name)  # (outside the lock: it reads the directory) raises for an unknown name
        if future is None:  # (cannot happen: the second round has a source, so it loads)
            raise Refused("internal", f"adapter {name} could not be scheduled for loading")

        def done(f: Future) -> None:
            error = f.exception()
            if error is not None:
                then(None, error if isinstance(error, Refused) else Refused("internal", f"loading adapter {name} "
                                                                                     f"failed: {error}"))
                return
            with self._lock:
                if hold:
                    self._users[name] = self._users.get(name, 0) + 1
            then(f.result(), None)

        future.add_done_callback(done)

    def release(self, name: str) -> None:
        with self._lock:
            count = self._users.get(name, 0) - 1
            if count > 0:
                self._users[name] = count
            else:
                self._users.pop(name, None)

    def _source(self, name: str) -> Path:
        """Where adapter `name` is in the adapter directory; Refused(unknown_adapter) when it is not there."""
        known = ", ".join(self.names()[:20]) or "none"
        unknown = Refused("unknown_adapter", f"this server has no adapter {name!r} (it holds or can load: {known})")
        if self.directory is None or not NAME.fullmatch(name) or ".." in name.split("/"):
            raise unknown
        path = self.directory / name
        try:
            inside = path.resolve().is_relative_to(self.directory.resolve())
        except OSError:
            inside = False
        if not inside or not (path / PEFT_CONFIG).is_file():
            raise unknown
        return path

    def _load(self, name: str, source: Path) -> Task:
        """On the loading thread: read the adapter, make room for it (dropping the least recently used ones that
        no session holds), keep it."""
        try:
            try:
                task = self._read(str(source))
            except ConfigError as e:
                raise Refused("bad_adapter", str(e)) from None
            task.name = name
            with self._lock:
                try:
                    self._make_room(task)
                except Refused:
                    task.release()
                    raise
                self._loaded[name] = task
                self.loads += 1
            log.info("loaded adapter %s (%s, %d bytes)", name, task.kind, task.nbytes)
            trim_heap()
            return task
        finally:
            with self._lock:
                self._loading.pop(name, None)

    def _make_room(self, task: Task) -> None:
        config = self.config
        while self._loaded and (len(self._loaded) + 1 > config.max_adapters
                                or sum(t.nbytes for t in self._loaded.values()) + task.nbytes > config.max_bytes):
            victim = next((n for n in self._loaded if n not in self._pinned and not self._users.get(n)), None)
            if victim is None:
                raise Refused("busy", f"no room for adapter {task.name}: the {len(self._loaded)} adapters held are "
                                      "all in use (--max-adapters, --adapter-memory); try again shortly")
            self._loaded.pop(victim).release()  # no session or request holds it
            self.evictions += 1
            log.info("dropped adapter %s (least recently used) to load %s", victim, task.name)
        if self.evictions:
            trim_heap()
        if task.nbytes > config.max_bytes or config.max_adapters < 1:
            raise Refused("busy", f"adapter {task.name} does not fit this server's adapter memory")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def trim_heap() -> None:
    """Hand the C heap's free memory back to the system (glibc's malloc_trim; nothing elsewhere). Reading an adapter
    on the loading thread leaves its temporary buffers in that thread's heap, which glibc keeps: without this a server's
    memory grew by about 1.3x each adapter's own bytes (benchmarks/bench_adapters.py)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


__all__ = ["AdapterConfig", "AdapterStore", "trim_heap"]
