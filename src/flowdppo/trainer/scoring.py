"""Rewards of a rollout: gathered over processes, checked, turned into group advantages."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..advantages import compute_advantages
from .rollout import Plan


def score_rollout(accelerator, futures: list, plan: Plan, cfg,
                  weights: dict[str, float]) -> tuple[dict[str, Tensor], Tensor, int]:
    """Every process's rewards per name (global, ``(B_global,)`` each), the global
    advantages (NaN for dropped images) and the number of dropped images.

    A non-finite reward raises (``rewards.nonfinite: error``) or drops its image from the
    group statistics and the loss (``drop``); dropped images are counted in the metrics.
    """
    results = [f.result() for f in futures]
    local = {n: torch.cat([r[0][n] for r in results]) for n in results[0][0]}
    device = accelerator.device
    rewards = {n: accelerator.gather(v.to(device)).cpu() for n, v in local.items()}
    finite = torch.stack([torch.isfinite(v) for v in rewards.values()]).all(dim=0)
    dropped = int((~finite).sum())
    if dropped and cfg.rewards.nonfinite == "error":
        bad = [n for n, v in rewards.items() if not torch.isfinite(v).all()]
        raise ValueError(f"non-finite rewards from {bad} for {dropped} images; fix the reward "
                         "or set `rewards.nonfinite: drop` to drop such images (counted in metrics)")
    advantages = torch.zeros(len(plan.prompts))
    keep = finite.nonzero().squeeze(1)
    if len(keep):
        adv = cfg.advantages
        advantages[keep] = compute_advantages(
            {n: v[keep] for n, v in rewards.items()}, weights, plan.group_ids[keep],
            mode=adv.mode, std_scope=adv.std_scope, clip=adv.clip)
    advantages[~finite] = float("nan")  # marks dropped images; never reaches a loss
    return rewards, advantages, dropped


def reward_row(rewards: dict[str, Tensor], weights: dict[str, float], dropped: int) -> dict[str, Any]:
    """The iteration's reward columns: the weighted combination and each reward (finite only)."""
    combined = sum(weights[n] * v for n, v in rewards.items())
    finite = torch.isfinite(combined)
    row: dict[str, Any] = {
        "reward_mean": float(combined[finite].mean()) if finite.any() else float("nan"),
        "reward_std": float(combined[finite].std()) if finite.sum() > 1 else 0.0}
    for name, values in rewards.items():
        row[f"reward_{name}"] = float(values[torch.isfinite(values)].mean())
    row["reward_num_nonfinite"] = dropped
    return row
