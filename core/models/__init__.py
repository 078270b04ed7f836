"""Model families, one module each, and the lookup from a transformers config to its family."""

from __future__ import annotations

from typing import Any

from ...transport.errors import ConfigError
from .base import ClientPrefixes, ModelFamily, PassContext
from .bloom import BloomFamily
from .falcon import FalconFamily
from .llama import LlamaFamily
from .mixtral import MixtralFamily

FAMILIES: tuple[ModelFamily, ...] = (LlamaFamily(), BloomFamily(), FalconFamily(), MixtralFamily())


def supported_architectures() -> list[str]:
    return [arch for family in FAMILIES for arch in family.architectures]


def family_for(config: Any) -> ModelFamily:
    """The family that serves `config` (checked by it), or a ConfigError naming the supported architectures."""
    family = _find_family(config)
    family.check_config(config)
    return family


def _find_family(config: Any) -> ModelFamily:
    archs = list(getattr(config, "architectures", None) or [])
    for family in FAMILIES:
        if any(arch in family.architectures for arch in archs):
            return family
    if not archs:  # a config that names no architecture (as GGUF-derived ones often are): by its model_type
        for family in FAMILIES:
            if getattr(config, "model_type", None) in family.model_types:
                return family
    shown = ", ".join(archs) or f"model_type {getattr(config, 'model_type', '?')!r}"
    raise ConfigError(f"unsupported architecture {shown}; swarm supports: {', '.join(supported_architectures())}")


__all__ = ["ClientPrefixes", "FAMILIES", "ModelFamily", "PassContext", "family_for", "supported_architectures"]
