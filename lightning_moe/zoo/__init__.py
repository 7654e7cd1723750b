"""The model zoo: architectures by preset name, built from the shared blocks in :mod:`lightning_moe.nn`."""

# Importing a family module registers its presets; baselines adds the tiny presets' dense baselines.
from lightning_moe.zoo import baselines, deepseek, glam, mixtral, qwen_moe, switch  # noqa: F401
from lightning_moe.zoo.registry import (
    ModelConfig,
    ParameterCount,
    build,
    config,
    count_parameters,
    dense_hidden_dim,
    densify,
    families,
    family_of,
    names,
    register_family,
    register_presets,
)
from lightning_moe.zoo.upcycle import upcycle

__all__ = [
    "ModelConfig",
    "ParameterCount",
    "build",
    "config",
    "count_parameters",
    "dense_hidden_dim",
    "densify",
    "families",
    "family_of",
    "names",
    "register_family",
    "register_presets",
    "upcycle",
]
