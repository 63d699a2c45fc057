"""DiffusionNFT: negative-aware fine-tuning on the forward process (SPEC §4).

Symbols: ``v`` current velocity (graph), ``v_old`` sampling policy's, ``v*`` = ``v_target``
``= eps - x0``, ``x_t = (1 - t) x0 + t eps``, ``A`` advantage, ``A_max`` = ``adv_max``.

1. Optimality probability ``r = clip(A / A_max / 2 + 1/2, 0, 1)``.
2. Implicit policies ``v+ = beta v + (1 - beta) v_old``, ``v- = (1 + beta) v_old - beta v``.
3. Per sample ``l = r e(v+) + (1 - r) e(v-)``:
   - ``"velocity"``: ``e(u) = mean((u - v*)^2)``;
   - ``"x0_adaptive"`` (the official code): in x0 space, ``x0(u) = x_t - t u``,
     ``e(u) = mean((x0(u) - x0)^2) / max(sg(mean|x0(u) - x0|), 1e-5)`` (sg: stop-gradient).
4. ``L = mean_samples l + kl_beta * mean_samples mean((v - v_ref)^2)``.

For a free ``v`` with the velocity weighting, ``L`` is minimised at
``v = v_old + (A / (A_max beta)) (v* - v_old)`` (for ``|A| <= A_max``): towards the target for
``A > 0``, away from it for ``A < 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .base import LossOutput, VelocityBatch, register_algorithm
from .common import check_nonnegative, check_positive, reduce_elements, rl_dtype

WEIGHTINGS = ("x0_adaptive", "velocity")
_ADAPTIVE_FLOOR = 1e-5  # the official code's lower bound on the adaptive weight


@dataclass(frozen=True)
class NFTHparams:
    beta: float = 1.0  # guidance strength of the implicit positive / negative policies, > 0
    adv_max: float = 5.0  # advantage mapped to optimality probability 1
    weighting: Literal["x0_adaptive", "velocity"] = "x0_adaptive"  # error space and weighting
    kl_beta: float = 0.0  # weight of mean((v - v_ref)^2); > 0 needs v_ref


def _check_batch(batch: VelocityBatch) -> None:
    names = ("v_old", "v_target", "x_t") + (("v_ref",) if batch.v_ref is not None else ())
    for name in names:
        if getattr(batch, name).shape != batch.v.shape:
            raise ValueError(f"batch.{name} has shape {tuple(getattr(batch, name).shape)} but "
                             f"batch.v has {tuple(batch.v.shape)}; they must match")
    n = batch.v.shape[0] if batch.v.ndim >= 2 else -1
    for name in ("t", "advantages"):
        if getattr(batch, name).shape != (n,):
            raise ValueError(f"batch.{name} has shape {tuple(getattr(batch, name).shape)}; "
                             f"expected ({n},) with batch.v of shape (N, *latent)")


def _error(u: Tensor, batch: VelocityBatch, weighting: str, dtype: torch.dtype) -> Tensor:
    """Per-sample error ``e(u)`` of step 3, shape ``(N,)``."""
    target = batch.v_target.to(dtype)
    if weighting == "velocity":
        return reduce_elements((u - target) ** 2, "mean")
    t = batch.t.to(dtype).view(-1, *([1] * (u.ndim - 1)))
    diff = -t * (u - target)  # x0(u) - x0 = (x_t - t u) - (x_t - t v*)
    scale = reduce_elements(diff.detach().abs(), "mean").clamp(min=_ADAPTIVE_FLOOR)
    return reduce_elements(diff**2, "mean") / scale


@register_algorithm("nft", kind="forward", hparams=NFTHparams, default_dynamics="ode")
def nft_loss(
    batch: VelocityBatch, *, beta: float, adv_max: float, weighting: str, kl_beta: float
) -> LossOutput:
    """DiffusionNFT's loss; metrics ``loss_policy``, ``optimality_prob_mean``,
    ``v_delta_norm`` (mean over samples of ``mean((v - v_old)^2)``), ``kl_ref_mean``
    (same for ``v_ref``, when given), all 0-d detached float32."""
    check_positive("beta", beta)
    check_positive("adv_max", adv_max)
    check_nonnegative("kl_beta", kl_beta)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}: expected one of {WEIGHTINGS}")
    if kl_beta > 0 and batch.v_ref is None:
        raise ValueError(f"kl_beta={kl_beta} > 0 needs batch.v_ref (the reference velocity); "
                         "compute it or set kl_beta=0")
    _check_batch(batch)
    dtype = rl_dtype(batch.v.dtype)
    v, v_old = batch.v.to(dtype), batch.v_old.detach().to(dtype)
    r = (batch.advantages.detach().to(dtype) / adv_max / 2 + 0.5).clamp(0, 1)
    v_pos = beta * v + (1 - beta) * v_old
    v_neg = (1 + beta) * v_old - beta * v
    loss_policy = (r * _error(v_pos, batch, weighting, dtype)
                   + (1 - r) * _error(v_neg, batch, weighting, dtype)).mean()
    loss = loss_policy
    metrics = {"loss_policy": loss_policy.detach().float(), "optimality_prob_mean": r.mean().float(),
               "v_delta_norm": reduce_elements((v - v_old).detach() ** 2, "mean").mean().float()}
    if batch.v_ref is not None:
        kl_ref = reduce_elements((v - batch.v_ref.detach().to(dtype)) ** 2, "mean")
        metrics["kl_ref_mean"] = kl_ref.detach().mean().float()
        if kl_beta > 0:
            loss = loss + kl_beta * kl_ref.mean()
    return loss, metrics
