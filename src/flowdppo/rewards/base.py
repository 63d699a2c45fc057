"""The reward interface, its registry and the weighted set of rewards a run uses.

A reward is a callable ``(images, prompts, metadata) -> (rewards, info)``:

- ``images``: `Tensor` of shape `(B, C, H, W)`, float32 in [0, 1], on any device.
- ``prompts``: `list[str]` of length B; ``metadata``: `list[dict]` of length B.
- ``rewards``: `Tensor` of shape `(B,)`, float32 on the CPU; ``info``: a dict of extras
  (per-image details, timings) that the trainer may log.

Factories import heavy models lazily, so ``build_reward`` is cheap until first use.
A *monitor* is an evaluation-only metric over a whole set of images (diversity, feature
distance): ``(images, prompts, metadata) -> dict[str, float]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..registry import Registry

RewardOutput = tuple[Tensor, dict[str, Any]]


class Reward(Protocol):
    def __call__(
        self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> RewardOutput: ...


class Monitor(Protocol):
    def __call__(
        self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> dict[str, float]: ...


REWARDS: Registry[Callable[..., Reward]] = Registry("reward")
MONITORS: Registry[Callable[..., Monitor]] = Registry("monitor")


def register_reward(name: str) -> Callable:
    """Decorator registering a reward factory ``(**kwargs) -> Reward``."""
    return REWARDS.register(name)


def register_monitor(name: str) -> Callable:
    """Decorator registering a monitor factory ``(**kwargs) -> Monitor``."""
    return MONITORS.register(name)


def build_reward(name: str, **kwargs: Any) -> Reward:
    """A registered reward (or ``package.module:factory``) built with ``kwargs``."""
    return REWARDS.lookup(name)(**kwargs)


def build_monitor(name: str, **kwargs: Any) -> Monitor:
    """A registered monitor (or ``package.module:factory``) built with ``kwargs``."""
    return MONITORS.lookup(name)(**kwargs)


@dataclass(frozen=True)
class WeightedReward:
    name: str
    reward: Reward
    weight: float = 1.0


class RewardSet:
    """Several rewards evaluated together; optionally in a thread pool (async).

    ``compute`` returns one `(B,)` float32 CPU tensor per reward name. ``submit`` returns a
    future of the same, so reward models can run while the next rollout samples.
    """

    def __init__(self, rewards: Sequence[WeightedReward], num_workers: int = 1) -> None:
        if not rewards:
            raise ValueError("a run needs at least one reward")
        self.rewards = list(rewards)
        self._pool = ThreadPoolExecutor(max_workers=num_workers) if num_workers > 0 else None

    @property
    def weights(self) -> dict[str, float]:
        return {r.name: r.weight for r in self.rewards}

    def compute(
        self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        values: dict[str, Tensor] = {}
        infos: dict[str, Any] = {}
        for item in self.rewards:
            rewards, info = item.reward(images, prompts, metadata)
            rewards = torch.as_tensor(rewards).detach().to("cpu", torch.float32).reshape(-1)
            if rewards.shape[0] != images.shape[0]:
                raise ValueError(
                    f"reward {item.name!r} returned {rewards.shape[0]} values for "
                    f"{images.shape[0]} images"
                )
            values[item.name] = rewards
            infos[item.name] = info
        return values, infos

    def submit(
        self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> Future:
        if self._pool is None:
            future: Future = Future()
            future.set_result(self.compute(images, prompts, metadata))
            return future
        return self._pool.submit(self.compute, images.detach(), list(prompts), list(metadata))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
