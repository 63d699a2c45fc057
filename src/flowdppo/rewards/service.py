"""The scoring side of the reward server: a queue, one worker thread, request coalescing.

Requests (`ScoreJob`) wait in a queue. One worker thread scores them, so the reward models
see a single caller. Before scoring, the worker takes the jobs already waiting that are
compatible (same image shape, same reward names) into one batch of at most
``max_batch_size`` images; every reward call gets at most ``max_batch_size`` images (bigger
batches are split into chunks). Results are split back per job. With several rewards hosted
and all computed, ``weighted_sum`` = sum of weight * reward is added. Per-image ``info``
entries (lists of length B) are kept and split per job; other info entries are dropped.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

WEIGHTED_SUM = "weighted_sum"
_STOP = object()  # queue sentinel: the worker exits


@dataclass
class ScoreJob:
    """One request's batch: `(B, C, H, W)` float32 numpy images, B prompts, B metadata."""

    images: Any
    prompts: list[str]
    metadata: list[dict]
    names: tuple[str, ...]
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] | None = None
    error: str | None = None

    def compatible(self, other: ScoreJob) -> bool:
        return self.names == other.names and self.images.shape[1:] == other.images.shape[1:]


class RewardService:
    """Scores queued jobs on one worker thread, coalescing waiting jobs (see module docstring)."""

    def __init__(
        self, rewards: Sequence[Any], max_batch_size: int = 64, coalesce: bool = True
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}; expected >= 1")
        self.rewards = {item.name: item for item in rewards}
        if len(self.rewards) != len(rewards) or WEIGHTED_SUM in self.rewards:
            raise ValueError(
                f"reward names must be unique and not {WEIGHTED_SUM!r}: "
                f"{[item.name for item in rewards]}"
            )
        self.max_batch_size, self.coalesce = max_batch_size, coalesce
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="reward-worker", daemon=True)
        self._worker.start()

    def submit(self, job: ScoreJob) -> ScoreJob:
        self._queue.put(job)
        return job

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the worker; a reward still running is left to finish on its daemon thread."""
        self._queue.put(_STOP)
        self._worker.join(timeout=timeout_s)

    def _run(self) -> None:
        carry = None
        while True:
            job = carry if carry is not None else self._queue.get()
            if job is _STOP:
                return
            batch, carry = self._gather(job)
            self._process(batch)

    def _gather(self, job: ScoreJob) -> tuple[list[ScoreJob], Any]:
        """``job`` plus the compatible jobs already waiting (up to max_batch_size images)."""
        batch, size = [job], job.images.shape[0]
        while self.coalesce and size < self.max_batch_size:
            try:
                other = self._queue.get_nowait()
            except queue.Empty:
                return batch, None
            if (
                other is _STOP
                or not job.compatible(other)
                or size + other.images.shape[0] > self.max_batch_size
            ):
                return batch, other
            batch.append(other)
            size += other.images.shape[0]
        return batch, None

    def _process(self, batch: list[ScoreJob]) -> None:
        import numpy as np

        try:
            images = np.concatenate([job.images for job in batch])
            prompts = [p for job in batch for p in job.prompts]
            metadata = [m for job in batch for m in job.metadata]
            values, infos = self.score(images, prompts, metadata, batch[0].names)
            start = 0
            for job in batch:
                end = start + job.images.shape[0]
                job.result = {
                    "rewards": {k: v[start:end] for k, v in values.items()},
                    "info": {
                        k: {key: v[start:end] for key, v in info.items()}
                        for k, info in infos.items()
                    },
                }
                start = end
        except Exception as err:  # the reward's failure goes back to every caller as a 500
            logger.exception("reward scoring failed")
            for job in batch:
                job.error = f"{type(err).__name__}: {err}"
        finally:
            for job in batch:
                job.done.set()

    def score(
        self, images, prompts: list[str], metadata: list[dict], names: Sequence[str]
    ) -> tuple[dict[str, list[float]], dict[str, dict[str, list]]]:
        """Rewards of `(B, C, H, W)` float32 numpy images, in chunks of ``max_batch_size``."""
        import torch

        x, step = torch.from_numpy(images), self.max_batch_size
        values: dict[str, list[float]] = {}
        infos: dict[str, dict[str, list]] = {}
        for name in names:
            item, values[name], infos[name] = self.rewards[name], [], {}
            for i in range(0, x.shape[0], step):
                rewards, info = item.reward(
                    x[i : i + step], prompts[i : i + step], metadata[i : i + step]
                )
                chunk = (
                    torch.as_tensor(rewards).detach().to("cpu", torch.float32).reshape(-1).tolist()
                )
                if len(chunk) != len(prompts[i : i + step]):
                    raise ValueError(
                        f"reward {name!r} returned {len(chunk)} values for "
                        f"{len(prompts[i : i + step])} images"
                    )
                values[name].extend(chunk)
                _extend_per_image(infos[name], info, len(chunk), first=i == 0)
            # Only entries per-image in every chunk can be split back per request.
            infos[name] = {k: v for k, v in infos[name].items() if len(v) == len(prompts)}
        if len(names) == len(self.rewards) > 1:
            values[WEIGHTED_SUM] = [
                sum(self.rewards[n].weight * values[n][j] for n in names)
                for j in range(len(prompts))
            ]
        return values, infos


def _extend_per_image(merged: dict[str, list], info: Any, size: int, first: bool) -> None:
    """Append ``info``'s per-image entries (length ``size``) to ``merged``; drop the rest."""
    for key, value in (info or {}).items() if isinstance(info, Mapping) else ():
        value = _jsonable(value)
        if isinstance(value, list) and len(value) == size and (first or key in merged):
            merged.setdefault(key, []).extend(value)


def _jsonable(value: Any) -> Any:
    """Tensors and arrays as lists, containers recursively, anything else unknown as text."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
