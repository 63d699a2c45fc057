"""Flow-DPPO: the policy gradient with a divergence mask instead of a ratio clip (SPEC §4).

1. ``L = -mean_entries(M * r * A) + beta * mean KL(theta || ref)``, ``M`` detached.
2. Exact mask (paper Eq. 17-18): ``M = 0`` iff ``D > delta`` and ``A (r - 1) > 0``, ``D`` the
   exact ``KL(old || theta)`` in the ``reduce`` unit (``delta`` in that unit) or the exact
   TV (``delta`` a probability). Corrective entries (``A (r - 1) <= 0``) are never masked.
3. Predictive mask (paper App. E, experimental): ``M = 0`` iff ``D > delta`` and
   ``A (log r - KL) > 0``. With ``x' = mu_old + s eps``, ``d = mu - mu_old``:
   ``grad_mu log r = (s eps - d) / s^2``, ``grad_mu KL = d / s^2`` and their inner product is
   ``(log r - KL)`` times a positive factor, i.e. the sign says whether the step the
   advantage asks for increases the divergence (to first order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..dynamics import gaussian_tv
from .base import LossOutput, PolicyStepBatch, register_algorithm
from .common import (
    aggregate,
    check_reduce,
    finish,
    kl_old_new,
    log_ratio,
    prepare,
    ratio_metrics,
    reference_kl,
)

DIVERGENCES = ("kl", "tv")
MASKS = ("exact", "predictive")


@dataclass(frozen=True)
class DPPOHparams:
    threshold: float = 1e-7  # delta: KL in the `reduce` unit, or a TV probability in (0, 1)
    divergence: Literal["kl", "tv"] = "kl"  # exact divergence the mask compares with delta
    reduce: Literal["mean", "sum"] = "mean"  # log-prob / KL over latent elements
    mask: Literal["exact", "predictive"] = "exact"  # Eq. 17-18, or App. E's first-order rule
    beta: float = 0.0  # weight of KL(theta || ref); > 0 needs mean_ref


def dppo_keep_mask(
    advantages: Tensor, log_ratio: Tensor, divergence: Tensor, threshold: float
) -> Tensor:
    """The exact Flow-DPPO mask: False (masked) iff ``D > delta`` and ``A (r - 1) > 0``.

    ``sign(r - 1) = sign(log r)``: the sign is read from ``log r`` so a ratio that rounds to
    1.0 in float32 keeps its direction.

    Args:
        advantages (`Tensor` of shape `(N,)`): ``A``.
        log_ratio (`Tensor` of shape `(N,)`): ``log r``.
        divergence (`Tensor` of shape `(N,)`): ``D`` per entry, in ``threshold``'s unit.
        threshold (`float`): ``delta`` >= 0.

    Returns:
        `BoolTensor` of shape `(N,)`, True where the entry is kept.
    """
    if not threshold >= 0:
        raise ValueError(f"threshold={threshold}: the divergence threshold must be >= 0")
    shapes = {tuple(advantages.shape), tuple(log_ratio.shape), tuple(divergence.shape)}
    if advantages.ndim != 1 or len(shapes) != 1:
        raise ValueError(f"advantages {tuple(advantages.shape)}, log_ratio {tuple(log_ratio.shape)} "
                         f"and divergence {tuple(divergence.shape)} must all have shape (N,)")
    pushing = ((advantages > 0) & (log_ratio > 0)) | ((advantages < 0) & (log_ratio < 0))
    return ~(pushing & (divergence > threshold))


def _check(threshold: float, divergence: str, mask: str) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r}: expected one of {DIVERGENCES}")
    if mask not in MASKS:
        raise ValueError(f"mask={mask!r}: expected one of {MASKS}")
    if not threshold >= 0:
        raise ValueError(f"threshold={threshold}: the divergence threshold must be >= 0")
    if divergence == "tv" and threshold >= 1:
        raise ValueError(f"threshold={threshold} with divergence='tv': TV is a probability in "
                         "[0, 1], so the threshold must lie in (0, 1)")


@torch.no_grad()
def _mask_metrics(keep: Tensor, advantages: Tensor) -> dict[str, Tensor]:
    masked = (~keep).float()

    def frac(where: Tensor) -> Tensor:  # 0 when no entry qualifies
        return (masked * where).sum() / where.sum().clamp(min=1)

    return {"mask_frac": masked.mean(), "mask_frac_pos": frac((advantages > 0).float()),
            "mask_frac_neg": frac((advantages < 0).float())}


@register_algorithm("dppo", kind="likelihood", hparams=DPPOHparams, default_dynamics="flow_sde")
def dppo_loss(
    batch: PolicyStepBatch, *, threshold: float, divergence: str, reduce: str, mask: str,
    beta: float,
) -> LossOutput:
    """Flow-DPPO's loss; returns ``(loss, metrics)``, metrics 0-d detached float32.

    Reports the common metrics plus ``mask_frac`` (all entries), ``mask_frac_pos`` /
    ``mask_frac_neg`` (among entries with ``A > 0`` / ``A < 0``) and, for TV,
    ``tv_old_new_mean`` / ``tv_old_new_max``.
    """
    check_reduce(reduce)
    _check(threshold, divergence, mask)
    replay = prepare(batch)
    log_r = log_ratio(replay, reduce)
    kl = kl_old_new(replay, reduce).detach()
    extra: dict[str, Tensor] = {}
    if divergence == "tv":
        d = gaussian_tv(replay.mean_old, replay.mean.detach(), replay.std)
        extra = {"tv_old_new_mean": d.mean().float(), "tv_old_new_max": d.max().float()}
    else:
        d = kl
    direction = log_r.detach() if mask == "exact" else log_r.detach() - kl
    keep = dppo_keep_mask(replay.advantages, direction, d, threshold)
    # Masked entries see a zeroed log-ratio: an overflowing r there must not make NaN gradients.
    ratio = torch.where(keep, log_r, torch.zeros_like(log_r)).exp()
    loss_policy = aggregate(-torch.where(keep, ratio * replay.advantages, torch.zeros_like(ratio)))
    loss_kl_ref, ref_metrics = reference_kl(replay, beta, reduce)
    metrics = {**ratio_metrics(log_r, kl, replay.advantages), **_mask_metrics(keep, replay.advantages),
               **extra, **ref_metrics}
    return finish(loss_policy, loss_kl_ref, metrics)
