"""lightning-moe: Mixture-of-Experts language models for PyTorch Lightning."""

from lightning_moe.nn import ExpertsConfig, MoEConfig, MoELayer, MoEStats, RouterConfig

__version__ = "0.1.0"

__all__ = ["ExpertsConfig", "MoEConfig", "MoELayer", "MoEStats", "RouterConfig", "__version__"]
