"""Pure losses, one file per method, chosen by name through a registry."""

from .base import (
    ALGORITHMS,
    AlgorithmSpec,
    LossOutput,
    PolicyStepBatch,
    VelocityBatch,
    get_algorithm,
    register_algorithm,
)

__all__ = [
    "ALGORITHMS",
    "AlgorithmSpec",
    "LossOutput",
    "PolicyStepBatch",
    "VelocityBatch",
    "get_algorithm",
    "register_algorithm",
]
