"""Rewards and evaluation monitors; built-ins register on first lookup."""

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

# Modules whose import registers rewards/monitors; missing optional ones are skipped.
_BUILTIN_MODULES = (
    "flowdppo.worlds.digits_rewards",
    "flowdppo.worlds.shapes_rewards",
    "flowdppo.worlds.video_rewards",
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
