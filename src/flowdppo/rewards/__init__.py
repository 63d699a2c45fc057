"""Rewards and evaluation monitors; built-ins register on first lookup."""

from __future__ import annotations

import importlib

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
    "flowdppo.rewards.monitors",
    "flowdppo.rewards.image_models",
    "flowdppo.rewards.simple",
    "flowdppo.rewards.ocr",
    "flowdppo.rewards.remote",
)
_loaded = False


def load_builtin_rewards() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if not (err.name and module.startswith(err.name)):
                raise


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
