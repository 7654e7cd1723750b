"""Callbacks that show and steer what the experts do: load monitoring, specialisation, collapse, capacity, bias."""

from lightning_moe.callbacks.capacity_factor_tuner import CapacityFactorTuner
from lightning_moe.callbacks.expert_collapse_detector import ExpertCollapseDetector
from lightning_moe.callbacks.expert_load_monitor import ExpertLoadMonitor
from lightning_moe.callbacks.expert_specialization import ExpertSpecialization
from lightning_moe.callbacks.load_balancing_bias import LoadBalancingBias

__all__ = [
    "CapacityFactorTuner",
    "ExpertCollapseDetector",
    "ExpertLoadMonitor",
    "ExpertSpecialization",
    "LoadBalancingBias",
]
