"""Generic out-of-domain monitors: diversity within a prompt, Fréchet distance of features.

Symbols: ``mu``, ``cov`` are the mean `(F,)` and covariance `(F, F)` of features; the Fréchet
distance between Gaussians is
``FD = ||mu_1 - mu_2||^2 + tr(cov_1) + tr(cov_2) - 2 tr((cov_1^{1/2} cov_2 cov_1^{1/2})^{1/2})``,
computed in float64 with symmetric eigendecompositions (no complex ``sqrtm`` residue).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .base import Monitor, register_monitor


def within_prompt_diversity(images: Tensor, prompts: Sequence[str]) -> float:
    """Mean pairwise L2 distance between images of the same prompt, averaged over prompts.

    Args:
        images (`Tensor` of shape `(B, C, H, W)`): any range; distances use flattened pixels.
        prompts (`list[str]` of length B): prompts with a single image are skipped.
    """
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
    rows: dict[str, list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        rows[prompt].append(i)
    flat = images.detach().reshape(images.shape[0], -1).double().cpu()
    per_prompt = []
    for idx in rows.values():
        if len(idx) < 2:
            continue
        dist = torch.cdist(flat[idx], flat[idx])  # (n, n), zero diagonal
        n = len(idx)
        per_prompt.append(float(dist.sum()) / (n * (n - 1)))
    if not per_prompt:
        raise ValueError("diversity needs at least 2 images of one prompt; set "
                         "eval.samples_per_prompt >= 2")
    return float(np.mean(per_prompt))


@register_monitor("diversity")
def diversity_monitor(device: str = "cpu") -> Monitor:
    """``{"diversity": mean pairwise L2 distance within a prompt}`` (``device`` unused)."""

    def monitor(images: Tensor, prompts: Sequence[str],
                metadata: Sequence[dict[str, Any]]) -> dict[str, float]:
        return {"diversity": within_prompt_diversity(images, prompts)}

    return monitor


def feature_stats(features: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean `(F,)` and unbiased covariance `(F, F)` of features `(N, F)`, float64."""
    feats = np.asarray(features.detach().cpu() if isinstance(features, Tensor) else features,
                       dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"features have shape {feats.shape}; expected (N >= 2, F)")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def mixture_stats(means: np.ndarray, covs: np.ndarray, weights: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a mixture with component ``means`` `(K, F)`, ``covs`` `(K, F, F)`
    and ``weights`` `(K,)` (normalised here): the law of total covariance."""
    w = np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        raise ValueError("mixture weights must have a positive sum")
    w = w / w.sum()
    mu = np.einsum("k,kf->f", w, means)
    second = np.einsum("k,kfg->fg", w, covs + np.einsum("kf,kg->kfg", means, means))
    return mu, second - np.outer(mu, mu)


def _psd_sqrt(mat: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((mat + mat.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(mu_1: np.ndarray, cov_1: np.ndarray, mu_2: np.ndarray,
                     cov_2: np.ndarray) -> float:
    """Fréchet distance between ``N(mu_1, cov_1)`` and ``N(mu_2, cov_2)`` (formula above)."""
    mu_1, mu_2 = np.asarray(mu_1, np.float64), np.asarray(mu_2, np.float64)
    cov_1, cov_2 = np.asarray(cov_1, np.float64), np.asarray(cov_2, np.float64)
    if mu_1.shape != mu_2.shape or cov_1.shape != cov_2.shape:
        raise ValueError(f"shapes differ: mu {mu_1.shape} vs {mu_2.shape}, cov {cov_1.shape} "
                         f"vs {cov_2.shape}")
    root_1 = _psd_sqrt(cov_1)
    # cov_1^{1/2} cov_2 cov_1^{1/2} is symmetric PSD: its root's trace is sum(sqrt(eigvals)).
    inner = np.linalg.eigvalsh(root_1 @ cov_2 @ root_1)
    trace_root = np.sqrt(np.clip(inner, 0.0, None)).sum()
    diff = mu_1 - mu_2
    value = diff @ diff + np.trace(cov_1) + np.trace(cov_2) - 2.0 * trace_root
    return float(max(value, 0.0))  # tiny negatives are round-off
