"""Rewards and evaluation monitors; built-ins register on first lookup.

Rewards defined by higher layers (the digits and shapes toy tasks) register from
``flowdppo.builtins``: this layer sits below them and does not import them.
"""

from __future__ import annotations

from ..lazy import module_loader
from .base import (
    MONITORS,
    REWARDS,
    Monitor,
    Reward,
    RewardSet,
    WeightedReward,
    build_monitor,
    build_reward,
    register_monitor,
    register_reward,
)

# This package's modules whose import registers rewards/monitors; missing optional ones
# are skipped.
_BUILTIN_MODULES = (
    "flowdppo.rewards.monitors",
    "flowdppo.rewards.image_models",
    "flowdppo.rewards.simple",
    "flowdppo.rewards.ocr",
    "flowdppo.rewards.remote",
    "flowdppo.rewards.video",
)
load_builtin_rewards = module_loader(_BUILTIN_MODULES)


__all__ = [
    "MONITORS",
    "REWARDS",
    "Monitor",
    "Reward",
    "RewardSet",
    "WeightedReward",
    "build_monitor",
    "build_reward",
    "load_builtin_rewards",
    "register_monitor",
    "register_reward",
]
