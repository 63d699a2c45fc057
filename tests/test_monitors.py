"""Generic monitors: Fréchet distance (against a scipy float64 reference) and diversity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowdppo.rewards import build_monitor
from flowdppo.rewards.monitors import (
    feature_stats,
    frechet_distance,
    mixture_stats,
    within_prompt_diversity,
)


def _reference_fd(mu1, cov1, mu2, cov2) -> float:
    # The textbook formula with scipy's general matrix square root.
    from scipy.linalg import sqrtm

    covmean = sqrtm(cov1 @ cov2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))


def _random_gaussian(rng, dim):
    a = rng.normal(size=(dim, dim))
    return rng.normal(size=dim), a @ a.T / dim + 0.1 * np.eye(dim)


def test_fd_matches_scipy_reference_on_small_gaussians():
    rng = np.random.default_rng(0)
    for dim in (1, 3, 8):
        mu1, cov1 = _random_gaussian(rng, dim)
        mu2, cov2 = _random_gaussian(rng, dim)
        assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(
            _reference_fd(mu1, cov1, mu2, cov2), rel=1e-9, abs=1e-10)


def test_fd_zero_for_identical_and_mean_shift_exact():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(200, 5))
    mu, cov = feature_stats(feats)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9)
    # Shifting every feature by s moves only the mean: FD = ||s||^2 exactly.
    shift = np.array([1.0, -2.0, 0.0, 0.5, 0.0])
    mu2, cov2 = feature_stats(feats + shift)
    assert frechet_distance(mu, cov, mu2, cov2) == pytest.approx(float(shift @ shift), rel=1e-9)
    # 1-D Gaussians: FD = (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance(np.zeros(1), np.eye(1) * 4.0, np.ones(1), np.eye(1)) == pytest.approx(2.0)


def test_fd_handles_singular_covariances():
    mu, cov = np.zeros(3), np.diag([1.0, 0.0, 0.0])  # rank 1: sqrtm is ill-conditioned here
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="shapes differ"):
        frechet_distance(mu, cov, np.zeros(2), np.eye(2))


def test_feature_stats_match_numpy_and_accept_tensors():
    feats = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    mu, cov = feature_stats(feats)
    np.testing.assert_allclose(mu, feats.double().mean(0).numpy())
    np.testing.assert_allclose(cov, np.cov(feats.double().numpy().T))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(np.zeros((1, 3)))


def test_mixture_stats_equal_pooled_sample_stats():
    rng = np.random.default_rng(2)
    parts = [rng.normal(loc=k, scale=1 + k, size=(n, 3)) for k, n in enumerate((10, 25, 7))]
    means = np.stack([p.mean(0) for p in parts])
    covs = np.stack([np.cov(p.T, bias=True) for p in parts])  # total covariance is exact for ML covs
    mu, cov = mixture_stats(means, covs, np.array([len(p) for p in parts]))
    pooled = np.concatenate(parts)
    np.testing.assert_allclose(mu, pooled.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(pooled.T, bias=True), rtol=1e-10, atol=1e-12)


def test_diversity_zero_for_identical_and_matches_hand_computation():
    image = torch.rand(1, 1, 4, 4)
    same = image.repeat(4, 1, 1, 1)
    assert within_prompt_diversity(same, ["a", "a", "b", "b"]) == 0.0
    x = torch.zeros(3, 1, 2, 2)
    x[1] += 1.0  # distance to x[0]: sqrt(4) = 2
    x[2] += 3.0  # alone under its prompt: skipped
    assert within_prompt_diversity(x, ["p", "p", "q"]) == pytest.approx(2.0)
    # Three images of one prompt: mean of the three pairwise distances.
    y = torch.tensor([0.0, 3.0, 4.0]).view(3, 1, 1, 1)
    assert within_prompt_diversity(y, ["p"] * 3) == pytest.approx((3 + 4 + 1) / 3)


def test_diversity_monitor_registry_and_errors():
    monitor = build_monitor("diversity")
    images = torch.rand(4, 1, 2, 2)
    out = monitor(images, ["a", "a", "b", "b"], [{}] * 4)
    assert set(out) == {"diversity"} and out["diversity"] > 0
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        monitor(images, ["a", "b", "c", "d"], [{}] * 4)
