"""Model sources and partial weight loading.

`ModelSource` resolves a model given as a local directory or a Hugging Face model id (through the hub and its cache;
a server fetches only the shards that hold its blocks), or as a GGUF file (`model.gguf`, or a directory or hub id
with `gguf_file=`; see `gguf.py`). `load_tensors` reads only the tensors under the requested
key prefixes from safetensors files, single or sharded through `model.safetensors.index.json`, so a server of blocks
0:2 never has the other blocks, the embeddings or the LM head in memory. Tensors are named as the model family names
them (the causal LM's names); a checkpoint saved from the base model alone, whose names lack the family's
`base_model_prefix` (the hub's BLOOM checkpoints: `h.0...` for `transformer.h.0...`), is read under those names too.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..transport.errors import ConfigError, SwarmError
from .device import auto_dtype
from .gguf import SUFFIX as GGUF_SUFFIX
from .gguf import GGUFFile, is_gguf
from .models import ModelFamily, family_for

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelSource:
    """A model's files: a local directory, or a hub repository fetched file by file into the hub cache."""

    def __init__(self, name_or_path: str | os.PathLike[str], gguf_file: str | None = None):
        self.name = str(name_or_path)
        path = Path(self.name).expanduser()
        if gguf_file is None and is_gguf(self.name) and path.is_file():  # a GGUF file given by its path
            path, gguf_file = path.parent, path.name
            self.name = str(Path(self.name).expanduser())
        self.local = path if path.is_dir() else None
        if self.local is None and (path.exists() or self.name.startswith((".", "/", "~"))
                                   or self.name.count("/") > 1):
            what = "a GGUF file" if is_gguf(self.name) else "a directory with a model in it"
            raise ConfigError(f"model path {self.name!r} is not {what}")
        if gguf_file is not None and not is_gguf(gguf_file):
            raise ConfigError(f"gguf_file must name a {GGUF_SUFFIX} file, got {gguf_file!r}")
        self.gguf_file = gguf_file  # the model is this GGUF file of the directory (or hub repository)
        self._gguf: GGUFFile | None = None
        self._gguf_names: dict[str, str] | None = None
        self._config: Any = None

    def file(self, filename: str, required: bool = True) -> Path | None:
        """Local path of one file of the model (downloaded into the hub cache when it is a hub id)."""
        if self.local is not None:
            path = self.local / filename
            if path.is_file():
                return path
            if required:
                raise ConfigError(f"{self.local} has no {filename}")
            return None
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

        if self._cache_only is not None:  # no request would get through
            cached = try_to_load_from_cache(self.name, filename)
            if isinstance(cached, str):
                return Path(cached)
            if not required:  # known to be absent, or never fetched (a snapshot download notes no absent files)
                return None
            if cached is None:
                raise self._offline_error(self._cache_only)
            raise ConfigError(f"model {self.name!r} has no {filename}")  # the cache knows the hub has none
        try:
            return Path(hf_hub_download(self.name, filename))
        except LocalEntryNotFoundError as e:  # (an EntryNotFoundError too) the hub went away since the probe
            raise self._offline_error(f"the Hugging Face hub cannot be reached ({_first_line(e)})") from None
        except EntryNotFoundError:
            if required:
                raise ConfigError(f"model {self.name!r} has no {filename}") from None
            return None
        except RepositoryNotFoundError:
            raise ConfigError(f"model {self.name!r} is neither a local directory nor a repository on the Hugging "
                              "Face hub that this machine may read (check the name; a gated model needs "
                              "`hf auth login`)") from None
        except Exception as e:  # network trouble after the probe, server errors...
            if not required and "404" in str(e):
                return None
            raise ConfigError(f"cannot get {filename} of model {self.name!r}: {_first_line(e)}") from None

    @functools.cached_property
    def _cache_only(self) -> str | None:
        """Why this hub model's files must come from the local cache alone (offline mode, no network), or None (also
        for a local model, which never asks the hub); the hub is asked once."""
        return None if self.local is not None else hub_unreachable(self.name)

    def _offline_error(self, problem: str) -> ConfigError:
        return ConfigError(f"model {self.name!r} is not in the local Hugging Face cache and {problem}; pass a local "
                           "model directory instead, or run once with network access to fill the cache")

    @property
    def path_for_transformers(self) -> str:
        return str(self.local) if self.local is not None else self.name

    @property
    def transformers_kwargs(self) -> dict[str, Any]:
        """What transformers' `from_pretrained` needs besides the path (the GGUF file's name)."""
        return {"gguf_file": self.gguf_file} if self.gguf_file is not None else {}

    def gguf(self) -> GGUFFile:
        """The model's GGUF file, opened once (fetched from the hub first when the model is a hub id)."""
        if self._gguf is None:
            if self.gguf_file is None:
                raise ConfigError(f"model {self.name!r} is not a GGUF file")
            path = self.file(self.gguf_file)
            self._gguf = GGUFFile(path)
        return self._gguf

    def tokenizer(self) -> Any:
        """The model's tokenizer (transformers' AutoTokenizer); a ConfigError when it cannot be loaded."""
        from transformers import AutoTokenizer

        problem = self._cache_only  # then from the cache, without waiting on retries
        try:
            return AutoTokenizer.from_pretrained(self.path_for_transformers, **self.transformers_kwargs,
                                                 local_files_only=problem is not None)
        except (OSError, ValueError) as e:
            if problem is not None:
                raise self._offline_error(problem) from None
            raise ConfigError(f"cannot load the tokenizer of {self.name!r}: {_first_line(e)}") from None

    def config(self, dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu") -> Any:
        """A copy of the transformers config, with sdpa attention, the `dtype` resolved for `device` and eval-time
        settings."""
        config = copy.deepcopy(self._read_config())  # the config as read stays as it was: each caller gets its own
        config.dtype = resolve_dtype(dtype, self._config, device)
        return config

    def _read_config(self) -> Any:
        """The config as read (once); only read here, never changed."""
        if self._config is None:
            from transformers import AutoConfig

            self.file(self.gguf_file or "config.json")
            if self.gguf_file is not None:
                self.gguf()  # a clear error for a corrupt file or an architecture swarm does not read
            try:
                config = AutoConfig.from_pretrained(self.path_for_transformers, **self.transformers_kwargs,
                                                    local_files_only=self._cache_only is not None)
            except (OSError, ValueError, KeyError) as e:
                raise ConfigError(f"cannot read the config of {self.name!r}: {e}") from None
            config._attn_implementation = "sdpa"
            self._config = config
        return self._config

    def family(self) -> ModelFamily:
        return family_for(self._read_config())

    def weight_map(self) -> dict[str, str]:
        """Tensor name (the family's) -> safetensors file name (or, for a GGUF file, the GGUF tensor name)."""
        return {name: filename for name, (_, filename) in self._stored_names().items()}

    def _stored_names(self) -> dict[str, tuple[str, str]]:
        """Tensor name (the family's) -> (its name in the checkpoint, the file or GGUF tensor name)."""
        stored = self._file_map()
        if self.gguf_file is not None:
            return {name: (name, where) for name, where in stored.items()}
        base = self.family().base_model_prefix
        if base and stored and not any(key.startswith(base) for key in stored):  # saved from the base model alone
            return {base + key: (key, where) for key, where in stored.items()}
        return {key: (key, where) for key, where in stored.items()}

    def _file_map(self) -> dict[str, str]:
        """Tensor name as stored -> safetensors file name (or, for a GGUF file, the GGUF tensor name)."""
        if self.gguf_file is not None:
            if self._gguf_names is None:
                config, family = self._read_config(), self.family()
                self._gguf_names = self.gguf().name_map(family.checkpoint_names(config), family.num_blocks(config))
            return dict(self._gguf_names)
        index = self.file(INDEX_FILE, required=False)
        if index is not None:
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ConfigError(f"{index} is not a valid safetensors index: {e}") from None
            return {str(k): str(v) for k, v in weight_map.items()}
        single = self.file(SINGLE_FILE, required=False)
        if single is None:
            if self._cache_only is not None:  # not "has none": the cache lacks them
                raise self._offline_error(self._cache_only)
            raise ConfigError(f"model {self.name!r} has no {SINGLE_FILE} nor {INDEX_FILE} (only safetensors "
                              "checkpoints are supported)")
        with safe_open(single, framework="pt") as f:
            return {key: SINGLE_FILE for key in f.keys()}

    def load_tensors(self, prefixes: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Only the tensors whose names start with one of `prefixes`, read file by file, cast to `dtype`."""
        prefixes = tuple(prefixes)
        if self.gguf_file is not None:
            config, gguf = self._read_config(), self.gguf()
            return {key: gguf.tensor(name, config, dtype) for key, name in self.weight_map().items()
                    if key.startswith(prefixes)}
        by_file: dict[str, list[tuple[str, str]]] = {}
        for name, (key, filename) in self._stored_names().items():
            if name.startswith(prefixes):
                by_file.setdefault(filename, []).append((name, key))
        tensors: dict[str, torch.Tensor] = {}
        for filename, names in sorted(by_file.items()):
            path = self.file(filename)
            with safe_open(path, framework="pt") as f:
                for name, key in names:
                    tensor = f.get_tensor(key)
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    tensors[name] = tensor
        log.debug("loaded %d tensors of %s under %s", len(tensors), self.name, prefixes)
        return tensors


HUB_PROBE_TIMEOUT = 5.0  # seconds the one request that checks whether the hub answers may take


def hub_unreachable(repo_id: str, repo_type: str = "model", filename: str = "config.json") -> str | None:
    """Why the Hugging Face hub cannot be used right now (offline mode, or no network), or None when it answers.

    One request without retries, bounded by HUB_PROBE_TIMEOUT: a machine without network learns it at once,
    instead of after huggingface_hub's retries (half a minute of warnings per file).
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

    offline = "the hub may not be used (offline mode: HF_HUB_OFFLINE is set)"
    if constants.is_offline_mode():
        return offline
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename, repo_type=repo_type), timeout=HUB_PROBE_TIMEOUT)
    except OfflineModeIsEnabled:
        return offline
    except (HfHubHTTPError, HFValidationError):  # an HTTP answer (not found, gated...), or a bad id: not the network
        return None
    except Exception as e:  # connection refused, no DNS, timeout...
        return f"the Hugging Face hub ({constants.ENDPOINT}) cannot be reached ({_first_line(e)})"
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= 200 else line[:197] + "..."


_LOCAL_COPIES: set[tuple[str, str, int, int]] = set()  # records' directories found to hold their model here


def is_local_copy(record: Any) -> bool:
    """Whether `record.path` (the directory a server announces it serves from) is, on this machine too, the
    directory of the model the record names: the same announced name, block count and hidden size. Found copies are
    remembered; a directory that is not one yet is looked at again next time."""
    from .aliases import announced_id

    key = (record.path, record.model, record.num_blocks, record.hidden_size)
    if key in _LOCAL_COPIES:
        return True
    try:
        if not record.path or not Path(record.path).is_absolute() or announced_id(record.path) != record.model:
            return False
        source = ModelSource(record.path)
        config = source.config()
        found = (source.family().num_blocks(config) == record.num_blocks
                 and int(config.hidden_size) == record.hidden_size)
    except (SwarmError, OSError, ValueError):  # not there, not a model, or another one
        return False
    if found:
        _LOCAL_COPIES.add(key)
    return found


def resolve_dtype(dtype: str | torch.dtype, config: Any = None, device: torch.device | str = "cpu") -> torch.dtype:
    """`auto` is what the checkpoint's dtype runs in on `device` (`core/device.py` `auto_dtype`: on the CPU the
    checkpoint's dtype, float32 when it says nothing or says float16; on a GPU a 16-bit dtype)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    if dtype != "auto":
        raise ConfigError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    stored = getattr(config, "dtype", None) if config is not None else None
    if isinstance(stored, str):
        stored = DTYPES.get(stored.replace("torch.", ""))
    return auto_dtype(torch.device(device), stored if stored in DTYPES.values() else None)


def strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def take_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """`strip_prefix`, taking the tensors out of `tensors` (which then no longer holds them)."""
    return {k[len(prefix):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}


def assign_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Load `tensors` into a module built on the meta device; a missing or misshapen tensor is a ConfigError."""
    expected = module.state_dict()
    missing = sorted(expected.keys() - tensors.keys())
    if missing:
        raise ConfigError(f"the checkpoint lacks tensors of {what}: {', '.join(missing[:5])}"
                          + (" ..." if len(missing) > 5 else ""))
    wrong = next((k for k in sorted(expected) if tensors[k].shape != expected[k].shape), None)
    if wrong is not None:
        raise ConfigError(f"the checkpoint's tensor {wrong} of {what} is {list(tensors[wrong].shape)}, but the "
                          f"model's config makes it {list(expected[wrong].shape)}")
    unexpected = sorted(tensors.keys() - expected.keys())
    if unexpected:
        log.debug("ignoring %d unexpected tensors of %s: %s", len(unexpected), what, unexpected[:5])
    module.load_state_dict({k: tensors[k] for k in expected}, strict=True, assign=True)


__all__: list[Any] = ["ModelSource", "hub_unreachable", "is_local_copy", "resolve_dtype", "assign_weights",
                   "strip_prefix", "take_prefix", "DTYPES"]
