"""Callbacks: what the experts do, shown and steered; and the checkpoint callback the configs use.

Load monitoring, specialisation, collapse, capacity and bias balancing for the experts; ``LastCheckpoint``
keeps ``last.ckpt`` at the end of the run.
"""

from lightning_moe.callbacks.capacity_factor_tuner import CapacityFactorTuner
from lightning_moe.callbacks.expert_collapse_detector import ExpertCollapseDetector
from lightning_moe.callbacks.expert_load_monitor import ExpertLoadMonitor
from lightning_moe.callbacks.expert_specialization import ExpertSpecialization
from lightning_moe.callbacks.last_checkpoint import LastCheckpoint
from lightning_moe.callbacks.load_balancing_bias import LoadBalancingBias

__all__ = [
    "CapacityFactorTuner",
    "ExpertCollapseDetector",
    "ExpertLoadMonitor",
    "ExpertSpecialization",
    "LastCheckpoint",
    "LoadBalancingBias",
]
