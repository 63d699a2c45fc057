"""Pieces shared by the likelihood losses: float32 views, log-ratio, reference KL, diagnostics.

Symbols (SPEC §3): ``N`` entries (sample, step); ``x'`` the stored sample; ``mu`` the current
mean (carries the graph); ``mu_old``, ``mu_ref`` the rollout and reference means (no graph);
``s`` the step's std, shape ``(N, 1, ..., 1)``; ``A`` advantages ``(N,)``;
``log r = log p_theta(x') - log p_old(x')``; ``KL`` the exact ``KL(old || theta)``.
``reduce`` is ``"mean"`` (per-element, all public code) or ``"sum"`` (true log-density / KL)
over the latent elements; every log-ratio and KL here is in that unit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..dynamics import REDUCTIONS, gaussian_kl
from .base import LossOutput, PolicyStepBatch


def rl_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 or better: bf16 loses the 1e-4 ratio scale; float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def check_reduce(reduce: str) -> None:
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce={reduce!r}: expected one of {REDUCTIONS} over the latent elements")


def check_nonnegative(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}={value}: must be a finite number >= 0")


def check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value}: must be a finite number > 0")


@dataclass(frozen=True)
class Replay:
    """A :class:`PolicyStepBatch` in float32 or better; ``std`` flattened copy in ``s``."""

    x_next: Tensor
    mean: Tensor
    mean_old: Tensor
    std: Tensor
    s: Tensor  # (N,) the std per entry
    advantages: Tensor
    mean_ref: Tensor | None


def prepare(batch: PolicyStepBatch) -> Replay:
    """Check shapes and cast to the RL dtype; ``mean_old`` and ``mean_ref`` are detached."""
    if batch.mean.ndim < 2:
        raise ValueError(f"batch.mean has shape {tuple(batch.mean.shape)}; expected (N, *latent)")
    n = batch.mean.shape[0]
    for name in ("x_next", "mean_old") + (("mean_ref",) if batch.mean_ref is not None else ()):
        if getattr(batch, name).shape != batch.mean.shape:
            raise ValueError(f"batch.{name} has shape {tuple(getattr(batch, name).shape)} but "
                             f"batch.mean has {tuple(batch.mean.shape)}; they must match")
    for name in ("advantages", "dt", "t"):
        if getattr(batch, name).shape != (n,):
            raise ValueError(f"batch.{name} has shape {tuple(getattr(batch, name).shape)}; "
                             f"expected ({n},), one value per entry")
    dtype = rl_dtype(batch.mean.dtype)
    std = batch.std.to(dtype)
    if std.shape != (n,) + (1,) * (batch.mean.ndim - 1):
        raise ValueError(f"batch.std has shape {tuple(std.shape)}; expected "
                         f"({n}, {', '.join('1' * (batch.mean.ndim - 1))}), one std per entry")
    ref = None if batch.mean_ref is None else batch.mean_ref.detach().to(dtype)
    return Replay(batch.x_next.detach().to(dtype), batch.mean.to(dtype),
                  batch.mean_old.detach().to(dtype), std, std.flatten(),
                  batch.advantages.detach().to(dtype), ref)


def reduce_elements(per_element: Tensor, reduce: str) -> Tensor:
    """Mean or sum over all but the first dimension: ``(N, *latent) -> (N,)``."""
    dims = tuple(range(1, per_element.ndim))
    return per_element.mean(dim=dims) if reduce == "mean" else per_element.sum(dim=dims)


def log_ratio(replay: Replay, reduce: str, *, normalised: bool = True) -> Tensor:
    """``log r = log p_theta(x') - log p_old(x')`` per entry, shape ``(N,)``, with graph.

    ``normalised=True``: the full Gaussian log-density of SPEC §3, whose difference is
    ``(||x' - mu_old||^2 - ||x' - mu||^2) / (2 s^2)``. ``normalised=False``: Flow-CPS's
    published ``log p = -||x' - mu||^2`` (no ``1/(2 s^2)``, no constants).
    Written as ``d . ((x' - mu_old) + (x' - mu)) / scale`` with ``d = mu - mu_old``: the same
    difference of the two log-densities with the constants cancelled exactly, so ``r == 1``
    exactly when ``mu == mu_old`` and tiny steps keep their precision in float32.
    """
    d = replay.mean - replay.mean_old
    per_element = d * ((replay.x_next - replay.mean_old) + (replay.x_next - replay.mean))
    if normalised:
        per_element = per_element / (2 * replay.std**2)
    return reduce_elements(per_element, reduce)


def kl_old_new(replay: Replay, reduce: str) -> Tensor:
    """Exact ``KL(old || theta) = ||mu_old - mu||^2 / (2 s^2)`` per entry ``(N,)``, with graph."""
    return gaussian_kl(replay.mean_old, replay.mean, replay.std, reduce)


def reference_kl(replay: Replay, beta: float, reduce: str) -> tuple[Tensor, dict[str, Tensor]]:
    """``beta * mean_entries KL(theta || ref)`` (with graph) and ``kl_ref_mean`` if ``mu_ref`` given."""
    check_nonnegative("beta", beta)
    if replay.mean_ref is None:
        if beta > 0:
            raise ValueError(f"beta={beta} > 0 needs batch.mean_ref (the reference policy's means); "
                             "record them in the rollout or set beta=0")
        return replay.mean.new_zeros(()), {}
    kl_ref = gaussian_kl(replay.mean, replay.mean_ref, replay.std, reduce)
    term = beta * kl_ref.mean() if beta > 0 else replay.mean.new_zeros(())
    return term, {"kl_ref_mean": kl_ref.detach().mean().float()}


def aggregate(per_entry: Tensor, weights: Tensor | None = None) -> Tensor:
    """The loss over entries: ``mean_i w_i l_i`` (``w = 1`` when not given)."""
    return per_entry.mean() if weights is None else (weights * per_entry).mean()


@torch.no_grad()
def ratio_metrics(log_r: Tensor, kl: Tensor, advantages: Tensor) -> dict[str, Tensor]:
    """Ratio statistics, exact and k3-estimated KL(old||theta), mean advantage (0-d float32)."""
    log_r, kl = log_r.detach(), kl.detach()
    ratio = log_r.exp()
    out = {
        "ratio_mean": ratio.mean(), "ratio_std": ratio.std(correction=0),
        "ratio_min": ratio.min(), "ratio_max": ratio.max(),
        "kl_old_new_mean": kl.mean(), "kl_old_new_max": kl.max(),
        # k3 estimator of KL(old || theta) from samples of the old policy.
        "approx_kl": ((ratio - 1) - log_r).mean(),
        "adv_mean": advantages.mean(),
    }
    return {k: v.float() for k, v in out.items()}


def clipped_surrogate(log_r: Tensor, advantages: Tensor, clip_range: float) -> tuple[Tensor, dict]:
    """PPO per-entry loss ``-min(r A, clip(r, 1-eps, 1+eps) A)`` and the clip fractions.

    ``clip_frac`` counts the entries whose gradient the clip removes: ``A > 0, r > 1 + eps``
    (``clip_frac_high``) or ``A < 0, r < 1 - eps`` (``clip_frac_low``); fractions of all entries.
    Clipped entries are the constants ``(1 +- eps) A``; their ratio is recomputed from a
    zeroed log-ratio so an overflowing ``r`` cannot turn their zero gradient into NaN.
    """
    check_positive("clip_range", clip_range)
    with torch.no_grad():
        ratio = log_r.exp()
        high = (advantages > 0) & (ratio > 1 + clip_range)
        low = (advantages < 0) & (ratio < 1 - clip_range)
        clipped = high | low
        bound = torch.where(high, 1 + clip_range, 1 - clip_range).to(log_r.dtype)
        metrics = {"clip_frac": clipped.float().mean(), "clip_frac_high": high.float().mean(),
                   "clip_frac_low": low.float().mean()}
    ratio = torch.where(clipped, torch.zeros_like(log_r), log_r).exp()
    return -torch.where(clipped, bound * advantages, ratio * advantages), metrics


def finish(loss_policy: Tensor, loss_kl_ref: Tensor, metrics: dict[str, Tensor]) -> LossOutput:
    """Total loss and the metrics dict with ``loss_policy`` / ``loss_kl_ref`` added (detached)."""
    out = {"loss_policy": loss_policy.detach().float(), "loss_kl_ref": loss_kl_ref.detach().float()}
    return loss_policy + loss_kl_ref, {**out, **metrics}
