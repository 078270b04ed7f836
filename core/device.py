"""Where blocks, caches and the client's modules run: `--device auto|cpu|cuda|cuda:N|mps`, and what `--dtype auto`
means there.

- `resolve_device`: `auto` is the first CUDA device when torch sees one, else the CPU (Apple's `mps` is used only
  when asked for: several of its kernels are slower than the CPU's for small batches, and bfloat16 is partial there).
  A device that is not present is a ConfigError naming what is.
- `auto_dtype`: on CUDA, the checkpoint's 16-bit dtype when it has one, else bfloat16 where the GPU computes it
  (Ampere and newer) and float16 elsewhere; on mps float16; on the CPU the checkpoint's dtype (float32 when it says
  nothing, and float32 for a float16 checkpoint: the CPU has few float16 kernels).

There is one code path for every device: weights are read on the CPU, converted (and quantized) block by block and
moved to the device; hidden states arrive and leave on the CPU (the wire is bytes) and are moved at the boundary.
"""

from __future__ import annotations

from typing import Any

import torch

from ..transport.errors import ConfigError

DEVICES = "auto, cpu, cuda, cuda:N, mps"
CPU = torch.device("cpu")  # where tensors are read from and written to the wire


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The torch device for `--device NAME` (checked to be present)."""
    if isinstance(name, torch.device):
        return name
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError("--device mps: this machine has no Apple GPU that torch can use; choose " + DEVICES)
        return torch.device("mps")
    if text == "cuda" or text.startswith("cuda:"):
        index_text = text.partition(":")[2]
        if index_text and not index_text.isdigit():
            raise ConfigError(f"--device {name}: a CUDA device is cuda or cuda:N (N a number)")
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: torch sees no CUDA GPU on this machine (a CPU-only torch, or no "
                              f"driver); choose cpu or auto")
        count = torch.cuda.device_count()
        index = int(index_text) if index_text else torch.cuda.current_device()
        if index >= count:
            raise ConfigError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return torch.device("cuda", index)
    raise ConfigError(f"unknown device {name!r}; choose {DEVICES}")


def auto_dtype(device: torch.device, stored: torch.dtype | None) -> torch.dtype:
    """What `--dtype auto` runs in on `device`, for a checkpoint stored in `stored` (None: it does not say)."""
    if device.type == "cuda":
        bf16 = bool(torch.cuda.is_bf16_supported())
        if stored == torch.float16 or (stored == torch.bfloat16 and not bf16):
            return torch.float16
        return torch.bfloat16 if bf16 else torch.float16
    if device.type == "mps":
        return torch.float16
    if stored in (torch.float32, torch.bfloat16):
        return stored
    return torch.float32  # unknown, float64, or float16 (few CPU kernels)


def device_name(device: torch.device) -> str:
    """`cuda:0`, `cpu`, `mps`: how a device is shown and keyed (throughput cache)."""
    return str(device)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a GPU runs asynchronously: timings need this; a CPU does not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def to_device(tensor: Any, device: torch.device) -> Any:
    """`tensor` on `device` (None stays None; already there: the same object, no copy)."""
    if tensor is None or tensor.device == device:
        return tensor
    return tensor.to(device)


__all__ = ["CPU", "DEVICES", "auto_dtype", "device_name", "resolve_device", "synchronize", "to_device"]
