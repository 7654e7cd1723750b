"""The model zoo: architectures by preset name, built from the shared blocks in :mod:`lightning_moe.nn`."""

from lightning_moe.zoo import mixtral  # noqa: F401  (registers its presets)
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
