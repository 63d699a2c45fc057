"""Flow-GRPO: PPO ratio clipping on replayed Flow-SDE steps (SPEC §4).

``L = -mean_entries min(r A, clip(r, 1 - eps, 1 + eps) A) + beta * mean KL(theta || ref)``
with ``log r`` in the ``reduce`` unit (clip range 1e-4 is a per-element value).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import LossOutput, PolicyStepBatch, register_algorithm
from .common import (
    aggregate,
    check_reduce,
    clipped_surrogate,
    finish,
    kl_old_new,
    log_ratio,
    prepare,
    ratio_metrics,
    reference_kl,
)


@dataclass(frozen=True)
class GRPOHparams:
    clip_range: float = 1e-4  # PPO clip on r, in the `reduce` log-prob unit
    reduce: Literal["mean", "sum"] = "mean"  # log-prob / KL over latent elements
    beta: float = 0.0  # weight of KL(theta || ref); > 0 needs mean_ref


def clip_loss(
    batch: PolicyStepBatch, *, clip_range: float, reduce: str, beta: float, normalised: bool = True
) -> LossOutput:
    """The clipped-ratio loss shared by Flow-GRPO and Flow-CPS.

    Args:
        batch: replayed steps; ``batch.mean`` carries the graph.
        clip_range: ``eps`` of the clip, > 0.
        reduce: ``"mean"`` or ``"sum"`` over latent elements (unit of ``log r`` and KL).
        beta: weight of the reference KL, >= 0.
        normalised: full Gaussian log-prob (True) or Flow-CPS's ``-||x' - mu||^2`` (False).

    Returns:
        ``(loss, metrics)``: 0-d loss with graph; metrics 0-d detached float32.
    """
    check_reduce(reduce)
    replay = prepare(batch)
    log_r = log_ratio(replay, reduce, normalised=normalised)
    per_entry, clip_metrics = clipped_surrogate(log_r, replay.advantages, clip_range)
    loss_kl_ref, ref_metrics = reference_kl(replay, beta, reduce)
    metrics = {**ratio_metrics(log_r, kl_old_new(replay, reduce), replay.advantages),
               **clip_metrics, **ref_metrics}
    return finish(aggregate(per_entry), loss_kl_ref, metrics)


@register_algorithm("grpo", kind="likelihood", hparams=GRPOHparams, default_dynamics="flow_sde")
def grpo_loss(batch: PolicyStepBatch, *, clip_range: float, reduce: str, beta: float) -> LossOutput:
    """Flow-GRPO's loss (see :func:`clip_loss`)."""
    return clip_loss(batch, clip_range=clip_range, reduce=reduce, beta=beta)
