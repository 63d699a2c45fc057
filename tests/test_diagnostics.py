"""The ratio-vs-divergence diagnostic against hand-derived and Monte-Carlo facts."""

from __future__ import annotations

import pytest
import torch

from flowdppo.algorithms import PolicyStepBatch
from flowdppo.algorithms.diagnostics import (
    finish_correlations,
    matched_threshold,
    ratio_vs_divergence,
)


def _corr(out):
    return finish_correlations({k: float(v) for k, v in out.items()})["diag_corr_logr_negkl"]


def _batch(n=4000, dim=64, scale=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    std = torch.full((n, 1), 0.3, dtype=torch.float64)
    mean_old = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    d = scale * torch.randn(n, dim, generator=gen, dtype=torch.float64) * torch.rand(n, 1, generator=gen, dtype=torch.float64)
    eps = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    return PolicyStepBatch(x_next=mean_old + std * eps, mean=mean_old + d, mean_old=mean_old, std=std,
                           advantages=adv, dt=torch.full((n,), 0.1), t=torch.full((n,), 0.5))


def test_matched_threshold_is_half_the_squared_clip_in_sum_units():
    assert matched_threshold(0.2, 10, "sum") == pytest.approx(0.02)
    # Per-element: eps_sum = D eps, delta_sum = (D eps)^2 / 2, delta_mean = delta_sum / D.
    assert matched_threshold(1e-4, 100, "mean") == pytest.approx((100 * 1e-4) ** 2 / 2 / 100)


def test_correlation_matches_the_variance_split_of_log_r():
    # log r = noise - KL with Var(noise) = 2 KL: the correlation of log r with -KL is
    # Std(KL) / sqrt(Var(KL) + E[2 KL]) (noise independent of KL), computed here by hand.
    batch = _batch()
    out = ratio_vs_divergence(batch, clip_range=0.1, reduce="sum")
    kl = ((batch.mean - batch.mean_old) ** 2 / (2 * batch.std**2)).sum(1)
    expected = kl.std() / torch.sqrt(kl.var() + 2 * kl.mean())
    assert _corr(out) == pytest.approx(float(expected), abs=0.05)
    assert 0.0 <= float(out["diag_clip_kl_disagree"]) <= 1.0


def test_no_disagreement_when_the_policy_has_not_moved():
    batch = _batch(scale=0.0)
    out = ratio_vs_divergence(batch, clip_range=1e-3, reduce="mean")
    assert float(out["diag_clip_kl_disagree"]) == 0.0
    assert _corr(out) is None  # undefined (no variance), reported as null


def test_rejects_a_non_positive_clip_range():
    with pytest.raises(ValueError, match="clip_range"):
        ratio_vs_divergence(_batch(n=4), clip_range=0.0)


def test_correlation_from_moments_equals_numpy_over_the_pooled_batch():
    """Moment sums from any split (micro-batches, processes) give the pooled correlation."""
    import numpy as np

    from flowdppo.algorithms.diagnostics import correlation_moments

    gen = torch.Generator().manual_seed(3)
    a = torch.randn(300, generator=gen, dtype=torch.float64)
    b = 0.4 * a + torch.randn(300, generator=gen, dtype=torch.float64)
    parts = [correlation_moments("c", a[i:j], b[i:j]) for i, j in ((0, 7), (7, 150), (150, 300))]
    pooled = {k: sum(float(p[k]) for p in parts) for k in parts[0]}
    expected = np.corrcoef(a.numpy(), b.numpy())[0, 1]
    assert finish_correlations(pooled)["c"] == pytest.approx(expected, rel=1e-9)
    assert set(finish_correlations(pooled)) == {"c"}  # the moment keys are consumed


def test_correlation_is_null_without_variance_on_either_side():
    from flowdppo.algorithms.diagnostics import correlation_moments, pearson_from_moments

    a = torch.linspace(-1, 1, 50, dtype=torch.float64)
    for b in (torch.zeros(50, dtype=torch.float64), torch.full((50,), 1e-7, dtype=torch.float64)):
        sums = {k: float(v) for k, v in correlation_moments("c", a, b).items()}
        assert finish_correlations(sums)["c"] is None
    assert pearson_from_moments(1, 1.0, 1.0, 1.0, 1.0, 1.0) is None  # one entry
