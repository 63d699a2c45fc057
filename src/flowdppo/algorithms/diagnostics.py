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

The correlation is over every entry of the batch, on all processes: each micro-batch
returns the moment sums ``n, sum a, sum b, sum a^2, sum b^2, sum ab`` (keys
``diag_corr_logr_negkl__*_sum``), the trainer adds them up everywhere and
:func:`finish_correlations` turns them into the correlation. It is ``None`` (null in the
logs) when either side has no variance, e.g. at the first update where every KL is 0, so
one process and N processes report the same thing.
"""

from __future__ import annotations

import math

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
        ``diag_kl_active`` (fractions), ``diag_matched_delta`` (the matched threshold), all
        0-d float32, and the float64 moment sums of ``(log r, -KL)``
        (``diag_corr_logr_negkl__{n,a,b,aa,bb,ab}_sum``) for the Pearson correlation.
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
    return {
        "diag_clip_kl_disagree": (clip_active != kl_active).float().mean(),
        "diag_clip_active": clip_active.float().mean(),
        "diag_kl_active": kl_active.float().mean(),
        "diag_matched_delta": torch.tensor(delta, dtype=torch.float32),
        **correlation_moments(CORRELATION, log_ratio, -kl),
    }


CORRELATION = "diag_corr_logr_negkl"
_MOMENTS = ("n", "a", "b", "aa", "bb", "ab")


def correlation_moments(name: str, a: Tensor, b: Tensor) -> dict[str, Tensor]:
    """The additive moment sums of ``(a, b)`` (each ``(N,)``) as ``{name}__{m}_sum``, float64."""
    a, b = a.detach().double(), b.detach().double()
    values = (a.new_tensor(float(a.numel())), a.sum(), b.sum(), a @ a, b @ b, a @ b)
    return {f"{name}__{m}_sum": v for m, v in zip(_MOMENTS, values)}


def pearson_from_moments(n: float, sa: float, sb: float, saa: float, sbb: float,
                         sab: float) -> float | None:
    """Pearson's r from moment sums; ``None`` when either variance is 0 (up to rounding:
    below 1e-12 of the mean square) or there are fewer than 2 entries."""
    if n < 2:
        return None
    var_a, var_b = saa - sa * sa / n, sbb - sb * sb / n
    if var_a <= 1e-12 * saa or var_b <= 1e-12 * sbb:
        return None
    return max(-1.0, min(1.0, (sab - sa * sb / n) / math.sqrt(var_a * var_b)))


def finish_correlations(metrics: dict[str, float | None]) -> dict[str, float | None]:
    """Replace every ``{name}__*_sum`` group of moment sums by ``name``'s correlation."""
    names = {k.split("__")[0] for k in metrics if k.endswith("__n_sum")}
    out = {k: v for k, v in metrics.items()
           if not any(k.startswith(f"{name}__") for name in names)}
    for name in sorted(names):
        sums = [metrics[f"{name}__{m}_sum"] for m in _MOMENTS]
        out[name] = None if any(s is None for s in sums) else pearson_from_moments(*sums)
    return out
