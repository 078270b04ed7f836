"""LoRA tuning on the client: low-rank updates of the blocks' linear layers, trained here, run by the servers.

`LoraTuning` holds, for every block and every targeted linear layer M, A [r, in] and B [out, r] (stacked over the
blocks: one parameter per layer name), initialised as PEFT does (A Kaiming-uniform, B zero: the model starts unchanged).
Each forward and backward sends every server the A and B of its blocks (`weights()`, as the wire's `LoraWeights`);
the server adds `(x A^T) B^T * alpha / r` to the layer's output and returns the gradients of A and B. Servers never
keep them. `save_lora` writes the result as a PEFT LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`)
that `peft.PeftModel.from_pretrained` loads onto the local model and `swarm serve --adapters` serves, plus swarm's
`tuning_config.json` (to continue training, and to load a classifier's head).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ...transport.errors import ConfigError
from ...transport.messages import LoraWeights
from ..adapters import PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS, model_linears, peft_lora_files
from ..models import ModelFamily

DEFAULT_TARGETS = ("q_proj", "v_proj")  # PEFT's default for Llama-like models (each family names its own)
HEAD_KEY = PEFT_PREFIX + "score.weight"  # a classifier's head, in the PEFT adapter (modules_to_save)


def resolve_targets(targets: list[str] | tuple[str, ...], linears: dict[str, tuple[int, int]]) -> list[str]:
    """Full layer names (e.g. "self_attn.q_proj") of `targets` given by short or full name, or "all-linear"."""
    if list(targets) == ["all-linear"]:
        return sorted(linears)
    chosen: list[str] = []
    for target in targets:
        found = [m for m in linears if m == target or m.endswith("." + target)]
        if not found:
            short = sorted({m.rsplit(".", 1)[-1] for m in linears})
            raise ConfigError(f"--lora-targets: {target!r} is not a linear layer of this model's blocks; choose from "
                              f"{', '.join(short)} (or all-linear)")
        chosen += [m for m in found if m not in chosen]
    if not chosen:
        raise ConfigError("--lora-targets names no layer")
    return sorted(chosen)


class LoraTuning(torch.nn.Module):
    """A trainable LoRA of all `num_blocks` blocks: per targeted layer, A [blocks, r, in] and B [blocks, out, r]."""

    mode = "lora"

    def __init__(self, linears: dict[str, tuple[int, int]], num_blocks: int, rank: int = 8, alpha: float = 16.0,
                 targets: list[str] | tuple[str, ...] = DEFAULT_TARGETS, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 < rank <= 1024:
            raise ConfigError(f"--lora-rank must be an integer in [1, 1024], got {rank!r}")
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise ConfigError(f"--lora-alpha must be a positive number, got {alpha!r}")
        self.rank, self.alpha, self.num_blocks = rank, float(alpha), num_blocks
        self.targets = resolve_targets(list(targets), linears)
        self.a = torch.nn.ParameterDict()
        self.b = torch.nn.ParameterDict()
        for module in self.targets:
            fan_in, fan_out = linears[module]
            a = torch.empty(num_blocks, rank, fan_in, dtype=dtype)
            for n in range(num_blocks):  # as PEFT initialises lora_A
                torch.nn.init.kaiming_uniform_(a[n], a=math.sqrt(5))
            self.a[_key(module)] = torch.nn.Parameter(a)
            self.b[_key(module)] = torch.nn.Parameter(torch.zeros(num_blocks, fan_out, rank, dtype=dtype))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def weights(self, dtype: torch.dtype | None = None) -> LoraWeights:
        """The LoRA as the wire sends it (differentiable: autograd sees the parameters through it)."""
        def cast(t: torch.Tensor) -> torch.Tensor:
            return t if dtype is None else t.to(dtype)
        return LoraWeights(self.scaling, {m: cast(self.a[_key(m)]) for m in self.targets},
                           {m: cast(self.b[_key(m)]) for m in self.targets})

    def per_block(self) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        return {(n, m): (self.a[_key(m)][n], self.b[_key(m)][n]) for m in self.targets for n in range(self.num_blocks)}

    def load_peft(self, weights: Path, family: ModelFamily, config: Any) -> None:
        """Copy a saved LoRA (PEFT's adapter_model.safetensors) into these parameters, checking every shape."""
        with safe_open(str(weights), framework="pt") as f:
            keys = set(f.keys())
            for module in self.targets:
                for part, stack in (("lora_A", self.a[_key(module)]), ("lora_B", self.b[_key(module)])):
                    for n in range(self.num_blocks):
                        key = f"{PEFT_PREFIX}{family.block_prefix(config, n)}{module}.{part}.weight"
                        if key not in keys:
                            raise ConfigError(f"{weights}: {key} is missing")
                        tensor = f.get_tensor(key)
                        if tensor.shape != stack.shape[1:]:
                            raise ConfigError(f"{weights}: {key} is {list(tensor.shape)}, expected "
                                              f"{list(stack.shape[1:])}")
                        with torch.no_grad():
                            stack[n].copy_(tensor.to(stack.dtype))


def _key(module: str) -> str:
    return module.replace(".", "__")


def new_lora(family: ModelFamily, config: Any, num_blocks: int, rank: int | None, alpha: float | None,
             targets: list[str] | tuple[str, ...] | None, dtype: torch.dtype) -> LoraTuning:
    return LoraTuning(model_linears(family, config, 0), num_blocks, 8 if rank is None else rank,
                      16.0 if alpha is None else alpha, family.lora_targets if not targets else targets, dtype)


def save_lora(directory: str | Path, lora: LoraTuning, head: dict[str, torch.Tensor], info: dict[str, Any],
              family: ModelFamily, config: Any, hidden_size: int) -> Path:
    """Write `lora` (and a classifier's head) as a PEFT LoRA adapter plus swarm's tuning_config.json."""
    from .ptune import FORMAT_VERSION, TUNED_CONFIG

    classification = info.get("task") == "classification"
    extra = {HEAD_KEY: head["weight"]} if classification and "weight" in head else {}
    directory = peft_lora_files(directory, lora.per_block(), family, config, lora.rank, lora.alpha, lora.targets,
                                info.get("model"), "SEQ_CLS" if classification else "CAUSAL_LM", extra,
                                ["score"] if extra else None)
    tuned = {"format": "swarm-tuned", "version": FORMAT_VERSION, "tuning_mode": "lora", "lora_rank": lora.rank,
             "lora_alpha": lora.alpha, "lora_targets": lora.targets, "hidden_size": hidden_size,
             "num_blocks": lora.num_blocks, **info}
    (Path(directory) / TUNED_CONFIG).write_text(json.dumps(tuned, indent=2) + "\n")
    return Path(directory)


def read_lora_result(directory: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A saved LoRA result's head tensors ("head.weight"), checking the directory holds its PEFT files."""
    if not (directory / PEFT_CONFIG).is_file() or not (directory / PEFT_WEIGHTS).is_file():
        raise ConfigError(f"{directory} is a swarm LoRA result without its {PEFT_CONFIG} / {PEFT_WEIGHTS}")
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(directory / PEFT_WEIGHTS), framework="pt") as f:
        if HEAD_KEY in f.keys():
            tensors["head.weight"] = f.get_tensor(HEAD_KEY)
    return tensors


__all__ = ["DEFAULT_TARGETS", "LoraTuning", "new_lora", "read_lora_result", "resolve_targets", "save_lora"]
