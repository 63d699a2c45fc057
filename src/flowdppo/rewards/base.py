"""The reward interface, its registry and the weighted set of rewards a run uses.

A reward is a callable ``(images, prompts, metadata) -> (rewards, info)``:

- ``images``: `Tensor` of shape `(B, C, H, W)`, or `(B, C, F, H, W)` for video models (F
  frames), float32 in [0, 1], on any device.
- ``prompts``: `list[str]` of length B; ``metadata``: `list[dict]` of length B.
- ``rewards``: `Tensor` of shape `(B,)`, float32 on the CPU; ``info``: a dict of extras
  (per-image details, timings) that the trainer may log.

Factories import heavy models lazily, so ``build_reward`` is cheap until first use.
A *monitor* is an evaluation-only metric over a whole set of images (diversity, feature
distance): ``(images, prompts, metadata) -> dict[str, float]``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..registry import Registry

RewardOutput = tuple[Tensor, dict[str, Any]]

logger = logging.getLogger(__name__)


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


class RewardCancelled(RuntimeError):
    """A reward computation abandoned by `RewardSet.cancel` (the run is stopping)."""


class RewardSet:
    """Several rewards evaluated together; optionally on worker threads (async).

    ``compute`` returns one `(B,)` float32 CPU tensor per reward name. ``submit`` returns a
    future of the same, so reward models can run while the next rollout samples.

    Lifetime: ``close()`` lets the queued work finish; ``cancel()`` (any thread, a signal
    handler included) fails every pending future with `RewardCancelled` at once and asks each
    reward that has a ``cancel()`` (the ``remote`` reward) to stop its waits. The workers are
    daemon threads, so a reward that ignores cancellation never holds the process's exit.
    """

    def __init__(self, rewards: Sequence[WeightedReward], num_workers: int = 1) -> None:
        if not rewards:
            raise ValueError("a run needs at least one reward")
        self.rewards = list(rewards)
        self._cancelled = threading.Event()
        # Re-entrant: cancel() may run in a signal handler while this thread is in submit().
        self._lock = threading.RLock()
        self._pending: set[Future] = set()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._workers = [
            threading.Thread(target=self._work, name=f"flowdppo-reward-{i}", daemon=True)
            for i in range(num_workers)
        ]
        for worker in self._workers:
            worker.start()

    @property
    def weights(self) -> dict[str, float]:
        return {r.name: r.weight for r in self.rewards}

    def compute(
        self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        values: dict[str, Tensor] = {}
        infos: dict[str, Any] = {}
        for item in self.rewards:
            self._raise_if_cancelled()
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
        future: Future = Future()
        if not self._workers:
            future.set_result(self.compute(images, prompts, metadata))
            return future
        with self._lock:
            if not self._cancelled.is_set():
                self._pending.add(future)
                self._queue.put((future, (images.detach(), list(prompts), list(metadata))))
        if self._cancelled.is_set():  # also when a cancel interrupted the block above
            self._settle(future, error=self._cancel_error())
        return future

    def cancel(self) -> None:
        """Fail pending futures now and stop the workers (idempotent, thread-safe)."""
        with self._lock:
            if self._cancelled.is_set():
                return
            self._cancelled.set()
            pending, self._pending = list(self._pending), set()
        for item in self.rewards:
            stop = getattr(item.reward, "cancel", None)
            if callable(stop):
                try:
                    stop()
                except Exception:  # one reward's failure must not keep the others waiting
                    logger.exception("reward %r: cancel() failed", item.name)
        for future in pending:
            self._settle(future, error=self._cancel_error())
        for _ in self._workers:
            self._queue.put(None)

    def close(self, timeout_s: float | None = None) -> bool:
        """Finish the queued work and stop the workers; True once all of them have stopped.

        ``timeout_s``: the longest wait for them (default: no limit).
        """
        if not self._cancelled.is_set():
            for _ in self._workers:
                self._queue.put(None)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for worker in self._workers:
            worker.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(worker.is_alive() for worker in self._workers)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            future, args = item
            with self._lock:
                if future.done() or not future.set_running_or_notify_cancel():
                    continue  # failed by cancel() before it started
            try:
                result = self.compute(*args)
            except BaseException as err:  # handed to the waiting caller, whatever it is
                self._settle(future, error=err)
            else:
                self._settle(future, result=result)

    def _settle(self, future: Future, result: Any = None, error: BaseException | None = None) -> None:
        """Finish ``future`` unless cancel() already did (its caller has moved on)."""
        with self._lock:
            self._pending.discard(future)
            if future.done():
                return
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def _raise_if_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise self._cancel_error()

    @staticmethod
    def _cancel_error() -> RewardCancelled:
        return RewardCancelled("reward computation cancelled: the run is stopping")
