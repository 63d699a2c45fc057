"""Pure losses, one file per method, chosen by name through a registry.

Importing this package registers ``"grpo"``, ``"cps"``, ``"guard"``, ``"dppo"`` and ``"nft"``.
"""

from . import cps, dppo, grpo, guard, nft  # noqa: F401  (registration side effect)
from .base import (
    ALGORITHMS,
    AlgorithmSpec,
    LossOutput,
    PolicyStepBatch,
    VelocityBatch,
    get_algorithm,
    register_algorithm,
)
from .dppo import dppo_keep_mask


def load_builtin_algorithms() -> None:
    """The built-ins registered when this package was imported; nothing more to load."""

__all__ = [
    "ALGORITHMS",
    "AlgorithmSpec",
    "LossOutput",
    "PolicyStepBatch",
    "VelocityBatch",
    "dppo_keep_mask",
    "get_algorithm",
    "load_builtin_algorithms",
    "register_algorithm",
]
