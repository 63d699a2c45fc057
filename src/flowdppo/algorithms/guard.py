"""GRPO-Guard: a normalised ratio clipped with PPO, steps weighted by ``1/dt`` (SPEC §4).

1. ``log r_hat = s * (log r + KL)`` per entry, ``KL`` the exact ``KL(old || theta)`` in the same
   ``reduce`` unit, with its gradient. With ``x' = mu_old + s eps`` and ``d = mu - mu_old``,
   ``log r + KL = reduce(eps d) / s``: the shift ``E[log r] = -KL`` is removed and the
   ``1/s`` scale equalised across steps, so ``log r_hat = reduce(eps d)``. The shift uses
   only that entry's own means: it is per sample, never over the batch.
2. ``l_i = -min(r_hat A, clip(r_hat, 1 - eps, 1 + eps) A)``.
3. ``L = mean_i w_i l_i + beta * mean KL(theta || ref)`` with ``w_i = (1/dt_i) / mean_j(1/dt_j)``:
   the weights are normalised to mean 1 over the batch the loss is given (a micro-batch,
   when the trainer splits one), so the loss keeps the scale of the unweighted mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..dynamics import check_all
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
    rl_dtype,
)


@dataclass(frozen=True)
class GuardHparams:
    clip_range: float = 4e-6  # PPO clip on the normalised ratio r_hat
    reduce: Literal["mean", "sum"] = "mean"  # log-prob / KL over latent elements
    beta: float = 0.0  # weight of KL(theta || ref); > 0 needs mean_ref


@register_algorithm("guard", kind="likelihood", hparams=GuardHparams, default_dynamics="flow_sde")
def guard_loss(batch: PolicyStepBatch, *, clip_range: float, reduce: str, beta: float) -> LossOutput:
    """GRPO-Guard's loss; returns ``(loss, metrics)``, metrics 0-d detached float32.

    Besides the common metrics (on the raw ratio ``r``), reports ``ratio_hat_min`` and
    ``ratio_hat_max``; the ``clip_frac*`` refer to ``r_hat``.
    """
    check_reduce(reduce)
    replay = prepare(batch)
    dt = batch.dt.detach().to(rl_dtype(batch.dt.dtype))
    check_all(dt > 0, "batch.dt must be > 0 (t - t_next) for GRPO-Guard's 1/dt step weights")
    log_r = log_ratio(replay, reduce)
    kl = kl_old_new(replay, reduce)
    log_r_hat = replay.s * (log_r + kl)
    per_entry, clip_metrics = clipped_surrogate(log_r_hat, replay.advantages, clip_range)
    weights = (1 / dt) / (1 / dt).mean()
    loss_kl_ref, ref_metrics = reference_kl(replay, beta, reduce)
    with torch.no_grad():
        ratio_hat = log_r_hat.exp()
        hat = {"ratio_hat_min": ratio_hat.min().float(), "ratio_hat_max": ratio_hat.max().float()}
    metrics = {**ratio_metrics(log_r, kl, replay.advantages), **clip_metrics, **hat, **ref_metrics}
    return finish(aggregate(per_entry, weights), loss_kl_ref, metrics)
