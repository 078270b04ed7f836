"""Prompt tuning on the client: trainable soft prompts that the swarm's frozen blocks run with.

- `ptune`: `pre_seq_len` trainable embeddings prepended to every input (the attention mask covers them).
- `deep_ptune`: the same, plus a trainable prompt for every block, sent along with each forward/backward (and the
  first step of an inference session) to the server that holds the block, which adds it to the hidden states of the
  prompt positions before the block and returns its gradient. Servers never keep or change anything.

The prompts live here, on the client, with the optimizer. `save_tuned`/`load_tuned` write and read them (and a task
head) as safetensors plus a JSON config; ptune prompts are also written in PEFT's prompt-tuning layout
(`adapter_config.json`, `adapter_model.safetensors`), so `peft.PeftModel.from_pretrained` loads them onto a local model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ...transport.errors import ConfigError

TUNING_MODES = ("ptune", "deep_ptune")
TUNED_CONFIG = "tuning_config.json"
TUNED_WEIGHTS = "prompts.safetensors"
FORMAT_VERSION = 1


class PromptTuning(torch.nn.Module):
    """Soft prompts [pre_seq_len, hidden] and, for deep_ptune, one more per block [num_blocks, pre_seq_len, hidden]."""

    def __init__(self, mode: str, pre_seq_len: int, hidden_size: int, num_blocks: int,
                 embeddings: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if mode not in TUNING_MODES:
            raise ConfigError(f"tuning_mode must be one of {', '.join(TUNING_MODES)}, got {mode!r}")
        if not isinstance(pre_seq_len, int) or isinstance(pre_seq_len, bool) or not 0 < pre_seq_len <= 4096:
            raise ConfigError(f"pre_seq_len must be an integer in [1, 4096], got {pre_seq_len!r}")
        self.mode, self.pre_seq_len = mode, pre_seq_len
        if embeddings is not None:  # start from the embeddings of random vocabulary tokens: in the inputs' range
            init = embeddings.detach()[torch.randint(embeddings.shape[0], (pre_seq_len,))].to(dtype).clone()
        else:
            init = torch.randn(pre_seq_len, hidden_size, dtype=dtype) * 0.02
        self.prompts = torch.nn.Parameter(init)
        self.deep_prompts = torch.nn.Parameter(torch.zeros(num_blocks, pre_seq_len, hidden_size, dtype=dtype)) \
            if mode == "deep_ptune" else None

    def extend(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The inputs with the prompts in front: (hidden, attention mask, deep prompts [blocks, 1, len, hidden])."""
        batch, length = hidden.shape[:2]
        prompts = self.prompts.to(hidden.dtype)[None].expand(batch, -1, -1)
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=hidden.device)
        ones = torch.ones(batch, self.pre_seq_len, dtype=attention_mask.dtype, device=attention_mask.device)
        deep = None if self.deep_prompts is None else self.deep_prompts.to(hidden.dtype)[:, None]
        return torch.cat([prompts, hidden], dim=1), torch.cat([ones, attention_mask], dim=1), deep


def save_tuned(directory: str | Path, tuning: PromptTuning, head: dict[str, torch.Tensor], info: dict[str, Any],
               hidden_size: int, num_blocks: int) -> Path:
    """Write prompts and head (`prompts.safetensors`), their config, and for ptune PEFT's prompt-tuning layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"prompts": tuning.prompts.detach().float().contiguous()}
    if tuning.deep_prompts is not None:
        tensors["deep_prompts"] = tuning.deep_prompts.detach().float().contiguous()
    tensors.update({f"head.{k}": v.detach().float().contiguous() for k, v in head.items()})
    save_file(tensors, str(directory / TUNED_WEIGHTS), metadata={"format": "swarm-tuned"})
    config = {"format": "swarm-tuned", "version": FORMAT_VERSION, "tuning_mode": tuning.mode,
              "pre_seq_len": tuning.pre_seq_len, "hidden_size": hidden_size, "num_blocks": num_blocks, **info}
    (directory / TUNED_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if tuning.mode == "ptune":
        _save_peft(directory, tuning, head, info, hidden_size, num_blocks)
    return directory


def _save_peft(directory: Path, tuning: PromptTuning, head: dict[str, torch.Tensor], info: dict[str, Any],
               hidden_size: int, num_blocks: int) -> None:
    classification = info.get("task") == "classification"
    config = {
        "peft_type": "PROMPT_TUNING", "task_type": "SEQ_CLS" if classification else "CAUSAL_LM",
        "num_virtual_tokens": tuning.pre_seq_len, "token_dim": hidden_size, "num_transformer_submodules": 1,
        "num_attention_heads": info.get("num_attention_heads"), "num_layers": num_blocks,
        "prompt_tuning_init": "RANDOM", "base_model_name_or_path": info.get("model"), "inference_mode": True,
        "modules_to_save": ["score"] if classification else None,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {"prompt_embeddings": tuning.prompts.detach().float().contiguous()}
    if classification:
        tensors.update({f"base_model.model.score.{k}": v.detach().float().contiguous() for k, v in head.items()})
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})


def read_tuned(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and tensors of a saved tuning result; a ConfigError says what is wrong with it."""
    directory = Path(directory)
    config_path, weights_path = directory / TUNED_CONFIG, directory / TUNED_WEIGHTS
    if config_path.is_file() and not weights_path.is_file():
        from ..adapters import read_peft_config

        config = read_peft_config(config_path, "a swarm tuning config")
        if config.get("tuning_mode") == "lora":  # a LoRA result: its weights are a PEFT adapter beside
            from .lora import read_lora_result

            if not isinstance(config.get("lora_rank"), int) or not isinstance(config.get("lora_targets"), list):
                raise ConfigError(f"{config_path} is not a swarm LoRA tuning config")
            return config, read_lora_result(directory, config)
    if not config_path.is_file() or not weights_path.is_file():
        raise ConfigError(f"{directory} is not a swarm tuning result (it needs {TUNED_CONFIG} and {TUNED_WEIGHTS}; "
                          "write one with `swarm tune ... --output DIR`)")
    try:
        config = json.loads(config_path.read_text())
        tensors = load_file(str(weights_path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the tuning result in {directory}: {e}") from None
    if not isinstance(config, dict) or config.get("format") != "swarm-tuned" \
            or config.get("tuning_mode") not in TUNING_MODES or not isinstance(config.get("pre_seq_len"), int):
        raise ConfigError(f"{config_path} is not a swarm tuning config")
    if config.get("version", 0) > FORMAT_VERSION:
        raise ConfigError(f"{config_path} was written by a newer swarm (format {config['version']})")
    return config, tensors


def load_prompts(tuning: PromptTuning, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy saved prompts into `tuning`, checking their shapes."""
    for name in ("prompts", "deep_prompts"):
        param = getattr(tuning, name)
        if param is None:
            continue
        saved = tensors.get(name)
        if saved is None or saved.shape != param.shape:
            raise ConfigError(f"{where}: {name} {list(saved.shape) if saved is not None else 'missing'} do not fit "
                              f"this model (expected {list(param.shape)})")
        with torch.no_grad():
            param.copy_(saved.to(param.dtype))
