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
}


def resolve_alias(name: str) -> str:
    """The full model id for a short alias (case-insensitive); other names are returned as they are."""
    return ALIASES.get(name.lower(), name)


def announced_id(name_or_path: str) -> str:
    """The model id a server announces: the hub id, or a local directory's name (as the client computes it too)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve().name
    return resolve_alias(name_or_path)


def matches(requested: str, announced: str) -> bool:
    """Whether a model a user asked for (id, alias, or local directory) is the one a server announces."""
    if announced == announced_id(requested):
        return True
    return announced.lower() == resolve_alias(requested).lower()
