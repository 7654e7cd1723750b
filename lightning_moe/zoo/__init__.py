"""The model zoo: architectures by preset name, built from the shared blocks in :mod:`lightning_moe.nn`."""

# Importing a family module registers its presets.
from lightning_moe.zoo import deepseek, glam, mixtral, qwen_moe, switch  # noqa: F401
from lightning_moe.zoo.registry import (
    ModelConfig,
    ParameterCount,
    build,
    config,
    count_parameters,
    families,
    family_of,
    names,
    register_family,
)

__all__ = [
    "ModelConfig",
    "ParameterCount",
    "build",
    "config",
    "count_parameters",
    "families",
    "family_of",
    "names",
    "register_family",
]
