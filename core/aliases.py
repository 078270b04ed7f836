"""Model names: the id a server announces, and short aliases for well-known models (one table, here)."""

from __future__ import annotations

from pathlib import Path

ALIASES: dict[str, str] = {
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "llama-2-70b-chat": "meta-llama/Llama-2-70b-chat-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3-70b": "meta-llama/Meta-Llama-3-70B",
    "llama-3-70b-instruct": "meta-llama/Meta-Llama-3-70B-Instruct",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "mistral-7b-instruct": "mistralai/Mistral-7B-Instruct-v0.2",
    "qwen2-7b": "Qwen/Qwen2-7B",
    "qwen2-72b": "Qwen/Qwen2-72B",
    "tinyllama": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "bloom": "bigscience/bloom",
    "bloom-560m": "bigscience/bloom-560m",
    "bloom-7b1": "bigscience/bloom-7b1",
    "bloomz": "bigscience/bloomz",
    "falcon-7b": "tiiuae/falcon-7b",
    "falcon-7b-instruct": "tiiuae/falcon-7b-instruct",
    "falcon-40b": "tiiuae/falcon-40b",
    "falcon-180b": "tiiuae/falcon-180B",
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "mixtral-8x7b-instruct": "mistralai/Mixtral-8x7B-Instruct-v0.1",
}


def resolve_alias(name: str) -> str:
    """The full model id for a short alias (case-insensitive); other names are returned as they are."""
    return ALIASES.get(name.lower(), name)


def announced_id(name_or_path: str, gguf_file: str | None = None) -> str:
    """The model id a server announces: the hub id, a local directory's name, or a GGUF file's name (as the client
    computes it too); a GGUF file of a hub repository is `REPO:FILE`."""
    path = Path(name_or_path).expanduser()
    if gguf_file is not None:
        return Path(gguf_file).name if path.is_dir() else f"{resolve_alias(name_or_path)}:{gguf_file}"
    if path.is_dir() or (path.is_file() and path.suffix.lower() == ".gguf"):
        return path.resolve().name
    return resolve_alias(name_or_path)


def matches(requested: str, announced: str, gguf_file: str | None = None) -> bool:
    """Whether a model a user asked for (id, alias, local directory or GGUF file) is the one a server announces."""
    if announced == announced_id(requested, gguf_file):
        return True
    if gguf_file is not None:
        return False
    return announced.lower() == resolve_alias(requested).lower()
