"""Advantages from rewards: GRPO group normalisation and multi-reward combination (SPEC §4).

Symbols: ``B`` samples; ``R`` rewards ``(B,)``; ``g`` group ids ``(B,)`` (one prompt's ``G``
images share an id); ``mean_g`` / ``std_g`` the statistics of a sample's group. Every std is
the population std (``1/n``, as numpy's ``np.std``). Computed in float64, returned float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

STD_SCOPES = ("global", "group")
MODES = ("weighted_sum", "gdpo")


def _check_rewards(rewards: dict[str, Tensor], group_ids: Tensor) -> None:
    if not rewards:
        raise ValueError("rewards is empty: give at least one reward")
    if group_ids.ndim != 1 or group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor of shape (B,), got "
                         f"{group_ids.dtype} of shape {tuple(group_ids.shape)}")
    for name, r in rewards.items():
        if r.shape != group_ids.shape:
            raise ValueError(f"reward {name!r} has shape {tuple(r.shape)} but group_ids has "
                             f"{tuple(group_ids.shape)}; one reward per sample")
        if not bool(torch.isfinite(r).all()):
            raise ValueError(f"reward {name!r} has non-finite values; fix the reward or drop "
                             "those samples before computing advantages")


def _check_clip(clip: float, eps: float) -> None:
    if not clip > 0:
        raise ValueError(f"clip={clip}: advantages are clipped to [-clip, clip]; must be > 0")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps={eps}: must be a finite number > 0")


def _group_stats(values: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Each sample's group mean and population std, both ``(B,)``."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    counts = counts.to(values.dtype)
    sums = torch.zeros_like(counts).index_add_(0, inverse, values)
    mean = (sums / counts)[inverse]
    sq = torch.zeros_like(counts).index_add_(0, inverse, (values - mean) ** 2)
    return mean, (sq / counts).sqrt()[inverse]


def group_advantages(
    rewards: Tensor, group_ids: Tensor, *, std_scope: str = "global", eps: float = 1e-4,
    clip: float = 5.0,
) -> Tensor:
    """GRPO advantages ``A = clip((R - mean_g(R)) / (std + eps), -clip, clip)``.

    Args:
        rewards (`Tensor` of shape `(B,)`): one scalar reward per sample, finite.
        group_ids (`Tensor` of shape `(B,)`, integer): the sample's prompt group.
        std_scope (`str`, defaults to `"global"`): `"global"` std over the whole batch (the
            recipe's ``global_std``) or `"group"` std within each group.
        eps (`float`, defaults to 1e-4): added to the std.
        clip (`float`, defaults to 5.0): bound on ``|A|``.

    Returns:
        `Tensor` of shape `(B,)`, float32.
    """
    if std_scope not in STD_SCOPES:
        raise ValueError(f"std_scope={std_scope!r}: expected one of {STD_SCOPES}")
    _check_clip(clip, eps)
    _check_rewards({"rewards": rewards}, group_ids)
    r = rewards.detach().double()
    mean, std_group = _group_stats(r, group_ids)
    std = r.std(correction=0) if std_scope == "global" else std_group
    return ((r - mean) / (std + eps)).clamp(-clip, clip).float()


def weighted_sum(rewards: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """``sum_k w_k R_k``; every reward needs a weight and every weight a reward. ``(B,)``."""
    missing = sorted(set(weights) - set(rewards))
    if missing:
        raise ValueError(f"weights name rewards {missing} that were not computed "
                         f"(rewards: {sorted(rewards)})")
    unweighted = sorted(set(rewards) - set(weights))
    if unweighted:
        raise ValueError(f"rewards {unweighted} have no weight; give them one (0 to ignore)")
    return sum(float(weights[k]) * rewards[k].double() for k in sorted(rewards))


def gdpo_advantages(
    rewards: dict[str, Tensor], group_ids: Tensor, weights: dict[str, float] | None = None, *,
    eps: float = 1e-4, clip: float = 5.0,
) -> Tensor:
    """GDPO: normalise each reward within its group, combine, renormalise over the batch.

    1. ``A_k = (R_k - mean_g(R_k)) / (std_g(R_k) + eps)`` for each reward ``k``
       (per-group mean and per-group std, whatever the single-reward ``std_scope``).
    2. ``S = sum_k w_k A_k`` (``w_k = 1`` when ``weights`` is None).
    3. ``A = clip((S - mean(S)) / (std(S) + eps), -clip, clip)`` with the batch mean and std
       (``mean(S)`` is 0 up to rounding: every ``A_k`` has zero mean per group).

    Args:
        rewards: name -> `Tensor` of shape `(B,)`, finite.
        group_ids (`Tensor` of shape `(B,)`, integer): the sample's prompt group.
        weights: name -> weight, or None for equal weights.

    Returns:
        `Tensor` of shape `(B,)`, float32.
    """
    _check_clip(clip, eps)
    _check_rewards(rewards, group_ids)
    weights = {k: 1.0 for k in rewards} if weights is None else weights
    normalised = {}
    for name, r in rewards.items():
        mean, std = _group_stats(r.detach().double(), group_ids)
        normalised[name] = (r.double() - mean) / (std + eps)
    total = weighted_sum(normalised, weights)
    return ((total - total.mean()) / (total.std(correction=0) + eps)).clamp(-clip, clip).float()


def compute_advantages(
    rewards: dict[str, Tensor], weights: dict[str, float], group_ids: Tensor, *,
    mode: str = "weighted_sum", std_scope: str = "global", clip: float = 5.0, eps: float = 1e-4,
) -> Tensor:
    """The trainer's entry point: ``(B,)`` float32 advantages from named rewards.

    ``mode="weighted_sum"``: :func:`group_advantages` of :func:`weighted_sum` (with
    ``std_scope``); ``mode="gdpo"``: :func:`gdpo_advantages` (per-group std by construction;
    ``std_scope`` is still validated).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    if std_scope not in STD_SCOPES:
        raise ValueError(f"std_scope={std_scope!r}: expected one of {STD_SCOPES}")
    _check_rewards(rewards, group_ids)
    if mode == "gdpo":
        return gdpo_advantages(rewards, group_ids, weights, eps=eps, clip=clip)
    total = weighted_sum(rewards, weights)
    return group_advantages(total, group_ids, std_scope=std_scope, eps=eps, clip=clip)
