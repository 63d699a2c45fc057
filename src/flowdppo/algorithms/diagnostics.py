"""The noise diagnostic of paper Sec. 3.3: ratio clipping vs the exact-divergence test.

With ``x' = mu_old + s eps`` and ``d = mu_theta - mu_old`` (sum convention),
``log r = eps.d / s - KL``: mean ``-KL``, variance ``2 KL``. A ratio clip at ``|r - 1| > eps``
is therefore a one-sample test of the divergence. Its *matched* divergence threshold is the
KL at which the log-ratio's noise alone has standard deviation ``eps_sum``:
``delta_sum = eps_sum^2 / 2`` (``eps_sum = D * eps`` when the clip acts on a per-element
mean log-ratio).

For each (sample, step) entry we compare the two decisions of "this entry is pushed outside
the trust region" (both require ``A (r - 1) > 0``, the direction the objective pushes):

- clip: ``|r - 1| > eps``;
- exact: ``KL > delta`` with the matched ``delta``.

and report the fraction of entries where they disagree, plus the correlation of ``log r``
with ``-KL`` (1 would mean the ratio measures the divergence; Sec. 3.3 says it is mostly noise).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..dynamics import gaussian_kl, gaussian_log_prob
from .base import PolicyStepBatch


def matched_threshold(clip_range: float, num_elements: int, reduce: str) -> float:
    """The KL threshold (in ``reduce``'s unit) matched to a ratio clip range ``clip_range``."""
    eps_sum = clip_range * num_elements if reduce == "mean" else clip_range
    delta_sum = eps_sum**2 / 2
    return delta_sum / num_elements if reduce == "mean" else delta_sum


@torch.no_grad()
def ratio_vs_divergence(batch: PolicyStepBatch, *, clip_range: float, reduce: str = "mean") -> dict[str, Tensor]:
    """Disagreement of ratio clipping with the exact-KL test on the same entries.

    Args:
        batch: replayed steps (only ``x_next``, ``mean``, ``mean_old``, ``std``, ``advantages``).
        clip_range: the ratio clip range ``eps`` in ``reduce``'s log-prob convention.
        reduce: ``"mean"`` or ``"sum"`` over the latent elements.

    Returns:
        ``diag_clip_kl_disagree`` (fraction of entries), ``diag_clip_active``,
        ``diag_kl_active`` (fractions), ``diag_corr_logr_negkl`` (Pearson correlation),
        ``diag_matched_delta`` (the matched threshold), all 0-d float32.
    """
    if clip_range <= 0:
        raise ValueError(f"clip_range={clip_range}: must be > 0")
    mean = batch.mean.detach().float()
    mean_old, std = batch.mean_old.float(), batch.std.float()
    log_ratio = (gaussian_log_prob(batch.x_next.float(), mean, std, reduce)
                 - gaussian_log_prob(batch.x_next.float(), mean_old, std, reduce))
    kl = gaussian_kl(mean_old, mean, std, reduce)
    num_elements = mean[0].numel()
    delta = matched_threshold(clip_range, num_elements, reduce)
    ratio = log_ratio.exp()
    pushing = batch.advantages.float() * (ratio - 1) > 0
    clip_active = pushing & ((ratio - 1).abs() > clip_range)
    kl_active = pushing & (kl > delta)
    corr = _pearson(log_ratio, -kl)
    return {
        "diag_clip_kl_disagree": (clip_active != kl_active).float().mean(),
        "diag_clip_active": clip_active.float().mean(),
        "diag_kl_active": kl_active.float().mean(),
        "diag_corr_logr_negkl": corr,
        "diag_matched_delta": torch.tensor(delta, dtype=torch.float32),
    }


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = a.norm() * b.norm()  # 0 when either side is constant: NaN, without a host sync
    return torch.where(denom > 0, a @ b / denom, torch.full_like(denom, float("nan"))).float()
