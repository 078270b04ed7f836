"""A server's throughput: measured once per model, dtype, weight quantization, device and swarm version, cached on
disk, announced as one number that servers and clients compare.

What is measured, on one block of the model built from its config with random weights (same shapes, dtype and weight
quantization as the real ones, so the same speed; nothing is read from the checkpoint):

- `forward_tps`: tokens per second through one block in a forward pass of 128 tokens (best of a few runs): what
  prefills and batch forwards cost.
- `inference_sps`: inference steps per second through one block, one new token on a cache of 64 (mean of a few
  steps): what generation costs.

The network is not measured: a loopback test says nothing about the link to other machines, and a speed test needs a
server on the Internet. `--bandwidth` (Mbit/s, default 100, a common uplink) gives it, and `network_tps` is the
tokens per second that link carries one way: bandwidth / (hidden size x bytes of the dtype).

The announced number (the record's `throughput`, tokens/s the server gives each block it holds) is Petals' formula:

    throughput = min(forward_tps / ((blocks + 1) / 2), network_tps)

A server of `blocks` blocks spends on each token the time of every block a request runs through; a chain enters or
leaves its span anywhere, so a request uses (blocks + 1) / 2 of its blocks on average. Keeping Petals' formula keeps
our numbers comparable with theirs; the balancer only needs them comparable between servers of one swarm.

The cache is one JSON file (`throughput.json` under $SWARM_CACHE_DIR, else ~/.cache/swarm) mapping a key (model,
dtype and weight quantization, device, threads, swarm version) to the two measured figures; a newer version or another
device measures again. A broken or unreadable file is measured over, never trusted.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ... import __version__
from ..demo import default_cache_dir
from ..device import CPU, synchronize

log = logging.getLogger(__name__)

DEFAULT_BANDWIDTH = 100.0  # Mbit/s assumed for the link to other servers when not told
CACHE_FILE = "throughput.json"
MAX_CACHE_ENTRIES = 256  # entries kept in the file (the oldest go first)


@dataclass(frozen=True)
class Throughput:
    forward_tps: float  # tokens/s through one block, forward pass of many tokens
    inference_sps: float  # inference steps/s through one block, one token with a cache
    network_tps: float = math.inf  # tokens/s the link carries one way
    source: str = "measured"  # measured | cache | given
    given: float | None = None  # --throughput NUMBER: announced as it is

    def announced(self, blocks: int) -> float:
        """The record's throughput for a server of `blocks` blocks (see the module's docstring)."""
        if self.given is not None:
            return self.given
        return round(min(self.forward_tps / ((max(1, blocks) + 1) / 2), self.network_tps), 2)

    def info(self, blocks: int) -> dict[str, Any]:
        """What `info` says of it."""
        return {"announced": self.announced(blocks), "forward_tps_per_block": self.forward_tps,
                "inference_sps_per_block": self.inference_sps,
                "network_tps": None if math.isinf(self.network_tps) else self.network_tps, "source": self.source}


def network_tps(bandwidth_mbit: float, hidden_size: int, dtype: torch.dtype) -> float:
    """Tokens/s a link of `bandwidth_mbit` carries one way (hidden states of `hidden_size` values in `dtype`)."""
    per_token = hidden_size * torch.empty((), dtype=dtype).element_size()
    return round(bandwidth_mbit * 1e6 / 8 / per_token, 1)


def cache_key(model: str, dtype: torch.dtype, device: str = "cpu", quant: str = "none") -> str:
    """What a measurement depends on: the model, its dtype and weight quantization, the device (and torch's threads on
    a CPU), swarm."""
    threads = f"x{torch.get_num_threads()}" if device == "cpu" else ""
    weights = str(dtype).removeprefix("torch.") + ("" if quant == "none" else f"+{quant}")
    return f"{model}|{weights}|{device}{threads}|{__version__}"


def cache_path() -> Path:
    return default_cache_dir() / CACHE_FILE


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cached(key: str, path: Path | None = None) -> Throughput | None:
    """The measurement cached under `key`, or None (none, or the entry is malformed)."""
    entry = _read_cache(path or cache_path()).get(key)
    if not isinstance(entry, dict):
        return None
    values = [entry.get("forward_tps"), entry.get("inference_sps")]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
               for v in values):
        return None
    return Throughput(float(values[0]), float(values[1]), source="cache")


def store(key: str, value: Throughput, path: Path | None = None) -> None:
    """Cache `value` under `key` (best effort: a read-only cache directory only costs a measurement next time)."""
    path = path or cache_path()
    data = _read_cache(path)
    data.pop(key, None)
    data[key] = {"forward_tps": value.forward_tps, "inference_sps": value.inference_sps, "measured_at": time.time()}
    while len(data) > MAX_CACHE_ENTRIES:
        data.pop(next(iter(data)))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(data, f, indent=1)
        os.replace(f.name, path)  # whole or not at all: two servers starting together never see half a file
    except OSError as e:
        log.warning("could not cache the throughput in %s: %s", path, e)


def measure(family: Any, config: Any, dtype: torch.dtype, forward_tokens: int = 128, repeats: int = 3,
            steps: int = 8, device: torch.device = CPU, quant: str = "none") -> Throughput:
    """Measure one block of the model (random weights of the real shapes, linear layers quantized as `quant`) on
    `device`."""
    from .backend import BlockSpan, quantized_block

    torch.manual_seed(0)
    with torch.device("meta"):  # built in `dtype` directly: no float32 copy of a big block on the way
        block = family.build_block(config, 0).to(dtype)
    block = block.to_empty(device=CPU)
    with torch.no_grad():
        for tensor in (*block.parameters(), *block.buffers()):
            if tensor.is_floating_point():
                tensor.normal_(0.0, 0.02)  # small finite values: the speed of real weights
            else:
                tensor.zero_()
    block = quantized_block(block, quant, dtype, device)  # built on the CPU, moved (and quantized) as a server does
    span = BlockSpan(family, config, 0, 1, [block], family.build_shared(config).to(device=device, dtype=dtype), dtype)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, forward_tokens, span.hidden_size, generator=generator).to(dtype)
    best = math.inf
    with torch.inference_mode():
        for _ in range(repeats):
            started = time.perf_counter()
            span(hidden)
            synchronize(device)
            best = min(best, time.perf_counter() - started)
        cache = span.new_cache(1, 64 + steps + 1)
        span.step(torch.randn(1, 64, span.hidden_size, generator=generator).to(dtype), cache)
        token = torch.randn(1, 1, span.hidden_size, generator=generator).to(dtype)
        span.step(token, cache)  # warm-up
        synchronize(device)
        started = time.perf_counter()
        for _ in range(steps):
            span.step(token, cache)
        synchronize(device)
        step = (time.perf_counter() - started) / steps
    return Throughput(round(forward_tokens / max(best, 1e-9), 1), round(1 / max(step, 1e-9), 1))


def resolve(mode: str | float, model: str, family: Any, config: Any, dtype: torch.dtype, bandwidth: float,
            path: Path | None = None, device: torch.device = CPU, quant: str = "none") -> Throughput:
    """The server's throughput for `--throughput MODE`: auto (cached, else measured and cached), eval (measured
    anew and cached) or a number (announced as given; nothing measured); of blocks quantized as `quant`."""
    net = network_tps(bandwidth, int(config.hidden_size), dtype)
    if not isinstance(mode, str):
        return Throughput(float(mode), float(mode), net, source="given", given=float(mode))
    key = cache_key(model, dtype, str(device), quant)
    found = cached(key, path) if mode == "auto" else None
    if found is not None:
        log.info("throughput from the cache: %.0f tokens/s (forward), %.1f steps/s (inference) per block",
                 found.forward_tps, found.inference_sps)
        return Throughput(found.forward_tps, found.inference_sps, net, source="cache")
    started = time.perf_counter()
    value = measure(family, config, dtype, device=device, quant=quant)
    log.info("measured throughput in %.1f s: %.0f tokens/s (forward), %.1f steps/s (inference) per block",
             time.perf_counter() - started, value.forward_tps, value.inference_sps)
    store(key, value, path)
    return Throughput(value.forward_tps, value.inference_sps, net, source="measured")


__all__ = ["DEFAULT_BANDWIDTH", "Throughput", "cache_key", "cache_path", "cached", "measure",
           "network_tps", "resolve", "store"]
