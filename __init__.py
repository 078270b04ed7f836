"""swarm: run and fine-tune large language models on machines pooled over a network."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "AutoDistributedModelForCausalLM": ("swarm.core.client.model", "AutoDistributedModelForCausalLM"),
    "DistributedModelForCausalLM": ("swarm.core.client.model", "DistributedModelForCausalLM"),
    "AutoDistributedModelForSequenceClassification": ("swarm.core.client.model",
                                                      "AutoDistributedModelForSequenceClassification"),
    "DistributedModelForSequenceClassification": ("swarm.core.client.model",
                                                  "DistributedModelForSequenceClassification"),
    "ClientConfig": ("swarm.core.client.config", "ClientConfig"),
    "Server": ("swarm.core.server", "Server"),
    "ServerConfig": ("swarm.core.server", "ServerConfig"),
    "SwarmError": ("swarm.transport.errors", "SwarmError"),
}


def __getattr__(name: str) -> Any:
    """Import heavy modules (torch, transformers) only when their names are used."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'swarm' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
