"""GGUF model files: the tensors of chosen blocks, dequantized, under transformers' names.

A GGUF file (llama.cpp's format) holds a model's metadata, tokenizer and tensors, each tensor stored whole and
indexed by name, often quantized. Swarm reuses what exists:
- the config and tokenizer come from transformers' own GGUF support (`from_pretrained(dir, gguf_file=...)`);
- the tensors are read through the `gguf` package's memory-mapped reader, named with its tensor-name map, and
  dequantized by `gguf.quants`; only the tensors asked for are ever dequantized, so a server of blocks 0:15 reads
  nothing else of the file.
What is swarm's own: the map from transformers' checkpoint names (the ones a family's modules use) to GGUF names,
built from the modules themselves, and undoing llama.cpp's reordering of the query/key rows of Llama-arch files.

Supported: the GGUF architectures whose config transformers reads and whose family swarm serves (llama, which also
covers Mistral-style models, and qwen2), with tensors in F32, F16, BF16 or the quant types `gguf` dequantizes
(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K and the IQ types). Anything else is a ConfigError naming what is supported.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..transport.errors import ConfigError

log = logging.getLogger(__name__)

SUFFIX = ".gguf"
# GGUF architectures (general.architecture) swarm reads, and the transformers model_type each becomes
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
# llama.cpp's converter reorders the rows of these tensors (per head, for its rotary layout) in Llama-arch files;
# the value names the config field that holds their head count
PERMUTED = {"llama": {"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"}}


def is_gguf(path: str | os.PathLike[str]) -> bool:
    return str(path).lower().endswith(SUFFIX)


class GGUFFile:
    """One GGUF file, opened (memory-mapped) once; tensors are dequantized on request."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            from gguf import GGUFReader

            self.reader = GGUFReader(self.path)
            arch_field = self.reader.fields.get("general.architecture")
            self.architecture = str(arch_field.contents()) if arch_field is not None else ""
            self.tensors = {t.name: t for t in self.reader.tensors}
        except ConfigError:
            raise
        except FileNotFoundError:
            raise ConfigError(f"no such GGUF file: {self.path}") from None
        except Exception as e:  # the reader fails in many ways on a truncated or corrupt file
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{self.path} is not a readable GGUF file ({reason}); it may be truncated or "
                              "corrupt: download it again") from None
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"{self.path.name}: GGUF architecture {self.architecture or '(none)'!r} is not "
                              f"supported; swarm reads GGUF files of: {', '.join(ARCHITECTURES)}")

    def name_map(self, hf_names: Iterable[str], num_blocks: int) -> dict[str, str]:
        """transformers checkpoint name -> GGUF tensor name, for the names this file holds."""
        import gguf

        arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == self.architecture)
        names = gguf.get_tensor_name_map(arch, num_blocks)
        out: dict[str, str] = {}
        for hf_name in hf_names:
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is not None and gguf_name in self.tensors:
                out[hf_name] = gguf_name
        return out

    def tensor(self, name: str, config: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `name` (a GGUF name), dequantized to float32 (then cast to `dtype`), in transformers' layout."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        info = self.tensors[name]
        kind = GGMLQuantizationType(info.tensor_type)
        try:
            array = dequantize(info.data, kind)
        except NotImplementedError:
            raise ConfigError(f"{self.path.name}: tensor {name} is stored as {kind.name}, which swarm cannot "
                              f"dequantize; supported: {', '.join(supported_types())}") from None
        except Exception as e:
            raise ConfigError(f"{self.path.name}: tensor {name} cannot be read ({e}); the file may be corrupt") \
                from None
        shape = [int(n) for n in reversed(info.shape.tolist())]
        if int(np.prod(shape)) != array.size:
            raise ConfigError(f"{self.path.name}: tensor {name} holds {array.size} values, its header says {shape}")
        tensor = torch.from_numpy(np.array(array, dtype=np.float32).reshape(shape))  # a copy: the file is read-only
        tensor = self._unpermute(name, tensor, config)
        return tensor.to(dtype) if dtype is not None else tensor

    def _unpermute(self, name: str, tensor: torch.Tensor, config: Any) -> torch.Tensor:
        """Undo llama.cpp's per-head row order of Llama-arch query/key projections (back to the HF layout)."""
        kind = name.split(".")[-2] if name.startswith("blk.") else ""
        heads_field = PERMUTED.get(self.architecture, {}).get(kind)
        if heads_field is None:
            return tensor
        heads = int(getattr(config, heads_field) or config.num_attention_heads)
        rows = tensor.shape[0]
        if rows % (2 * heads):
            raise ConfigError(f"{self.path.name}: tensor {name} has {rows} rows, not a multiple of 2 x {heads} heads")
        return (tensor.reshape(heads, rows // heads // 2, 2, *tensor.shape[1:]).transpose(1, 2)
                .reshape(tensor.shape))


def supported_types() -> list[str]:
    from gguf.quants import _type_traits

    return ["F32", "F16", *sorted(t.name for t in _type_traits)]


__all__ = ["ARCHITECTURES", "GGUFFile", "SUFFIX", "is_gguf", "supported_types"]
