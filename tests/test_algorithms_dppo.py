"""Flow-DPPO's mask: truth table, gradients, fractions, units, TV and the predictive rule.

Masks are recomputed here from the SPEC §4 rule with independent log-ratios and KLs
(``algo_helpers``), TV from ``scipy.stats.norm``; predictive directions from autograd.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from algo_helpers import make_batch, ref_kl, ref_log_ratio, run
from flowdppo.algorithms import dppo_keep_mask


def test_keep_mask_truth_table():
    threshold = 0.5
    signs = (1.0, -1.0, 0.0)
    divergences = (0.25, 0.5, 0.75)  # below, equal, above
    cases = list(itertools.product(signs, signs, divergences))
    adv = torch.tensor([a for a, _, _ in cases])
    log_r = torch.tensor([0.3 * s for _, s, _ in cases])  # sign of log r = sign of r - 1
    div = torch.tensor([d for _, _, d in cases])
    keep = dppo_keep_mask(adv, log_r, div, threshold)
    assert keep.dtype == torch.bool and keep.shape == (27,)
    for i, (a, s, d) in enumerate(cases):
        masked = a * s > 0 and d > threshold  # the exact rule, case by case
        assert bool(keep[i]) == (not masked), (a, s, d)
    assert int((~keep).sum()) == 2  # (+, +, above) and (-, -, above)


def test_keep_mask_reads_the_sign_from_log_ratio_not_a_rounded_ratio():
    # r = exp(1e-9) rounds to 1.0 in float32, but the step still moves with A.
    adv, log_r = torch.tensor([1.0]), torch.tensor([1e-9])
    assert float(log_r.exp() - 1) == 0.0
    assert not bool(dppo_keep_mask(adv, log_r, torch.tensor([1.0]), 0.5)[0])


def test_keep_mask_rejects_bad_input():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"threshold=-0.1"):
        dppo_keep_mask(x, x, x, -0.1)
    with pytest.raises(ValueError, match=r"must all have shape"):
        dppo_keep_mask(x, torch.zeros(4), x, 0.1)
    with pytest.raises(ValueError, match=r"must all have shape"):
        dppo_keep_mask(x.view(3, 1), x.view(3, 1), x.view(3, 1), 0.1)


def _hand_mask(batch, threshold, reduce="mean"):
    mean = batch.mean.detach()
    log_r = ref_log_ratio(batch, mean, reduce)
    kl = ref_kl(batch.mean_old, mean, batch.std, reduce)
    pushing = batch.advantages * log_r > 0
    return ~(pushing & (kl > threshold)), log_r


def test_corrective_updates_are_never_masked():
    batch, _ = make_batch(n=200, shape=(3,), scale=0.3, seed=20)
    _, log_r = _hand_mask(batch, 0.0)
    _, metrics = run("dppo", batch, threshold=0.0)
    corrective = batch.advantages * log_r <= 0
    assert corrective.any() and (~corrective).any()
    lib_keep = dppo_keep_mask(batch.advantages, log_r, ref_kl(
        batch.mean_old, batch.mean.detach(), batch.std, "mean"), 0.0)
    assert lib_keep[corrective].all() and not lib_keep[~corrective].any()
    assert float(metrics["mask_frac"]) == pytest.approx(float((~corrective).double().mean()))


def test_loss_gradient_is_zero_exactly_on_masked_entries():
    batch, _ = make_batch(n=40, shape=(2, 2), scale=0.05, seed=21)
    kl = ref_kl(batch.mean_old, batch.mean.detach(), batch.std, "mean")
    threshold = float(kl.median())
    keep, log_r = _hand_mask(batch, threshold)
    assert 0 < int((~keep).sum()) < len(keep)
    loss, metrics = run("dppo", batch, threshold=threshold)
    (grad,) = torch.autograd.grad(loss, batch.mean)
    row = grad.flatten(1).norm(dim=1)
    assert torch.all(row[~keep] == 0) and torch.all(row[keep] > 0)
    a = batch.advantages
    torch.testing.assert_close(loss.detach(), -(keep.double() * log_r.exp() * a).mean())
    pos, neg = a > 0, a < 0
    assert float(metrics["mask_frac"]) == pytest.approx(float((~keep).double().mean()))
    assert float(metrics["mask_frac_pos"]) == pytest.approx(float((~keep)[pos].double().mean()))
    assert float(metrics["mask_frac_neg"]) == pytest.approx(float((~keep)[neg].double().mean()))


def test_mask_fractions_are_zero_for_an_empty_sign_class():
    batch, _ = make_batch(n=6, scale=0.3, seed=22, advantages=torch.ones(6))
    _, metrics = run("dppo", batch, threshold=0.0)
    assert float(metrics["mask_frac_neg"]) == 0.0
    assert 0.0 < float(metrics["mask_frac_pos"]) <= 1.0


def test_threshold_is_in_the_reduce_unit():
    batch, _ = make_batch(n=50, shape=(2, 3), scale=0.05, seed=23)
    num_elements = 6
    kl_mean = ref_kl(batch.mean_old, batch.mean.detach(), batch.std, "mean")
    threshold = float(kl_mean.median())
    _, m_mean = run("dppo", batch, threshold=threshold, reduce="mean")
    _, m_sum = run("dppo", batch, threshold=threshold * num_elements, reduce="sum")
    assert 0 < float(m_mean["mask_frac"]) < 1
    assert float(m_mean["mask_frac"]) == float(m_sum["mask_frac"])
    # The same number in the other unit masks differently: units are not interchangeable.
    _, m_wrong = run("dppo", batch, threshold=threshold, reduce="sum")
    assert float(m_wrong["mask_frac"]) != float(m_mean["mask_frac"])


def test_tv_mask_uses_the_exact_total_variation():
    batch, _ = make_batch(n=40, shape=(3,), scale=0.05, seed=24)
    d = (batch.mean.detach() - batch.mean_old).numpy()
    s = batch.std.flatten().numpy()
    tv = np.array([2 * stats.norm.cdf(np.linalg.norm(d[i]) / (2 * s[i])) - 1 for i in range(len(s))])
    threshold = float(np.median(tv))
    log_r = ref_log_ratio(batch, batch.mean.detach()).numpy()
    a = batch.advantages.numpy()
    masked = (a * log_r > 0) & (tv > threshold)
    loss, metrics = run("dppo", batch, divergence="tv", threshold=threshold)
    assert float(metrics["mask_frac"]) == pytest.approx(masked.mean())
    assert float(metrics["tv_old_new_mean"]) == pytest.approx(tv.mean(), rel=1e-5)
    assert float(metrics["tv_old_new_max"]) == pytest.approx(tv.max(), rel=1e-5)
    (grad,) = torch.autograd.grad(loss, batch.mean)
    assert torch.all(grad.flatten(1).norm(dim=1)[torch.from_numpy(masked)] == 0)


def test_predictive_mask_follows_the_first_order_divergence_change():
    batch, _ = make_batch(n=60, shape=(4,), scale=0.1, seed=25)
    mean = batch.mean.detach().clone().requires_grad_(True)
    log_r = ref_log_ratio(batch, mean)
    kl = ref_kl(batch.mean_old, mean, batch.std, "mean")
    g_log_r = torch.autograd.grad(log_r.sum(), mean)[0].flatten(1)
    g_kl = torch.autograd.grad(kl.sum(), mean)[0].flatten(1)
    # The ascent step A grad log r increases KL (to first order) iff A <grad log r, grad KL> > 0.
    grows = batch.advantages * (g_log_r * g_kl).sum(1) > 0
    threshold = float(kl.detach().quantile(0.3))
    masked = grows & (kl.detach() > threshold)
    assert masked.any() and (~masked).any()
    loss, _ = run("dppo", batch, mask="predictive", threshold=threshold)
    (grad,) = torch.autograd.grad(loss, batch.mean)
    row = grad.flatten(1).norm(dim=1)
    assert torch.all(row[masked] == 0) and torch.all(row[~masked] > 0)
    # It differs from the exact rule on this batch (log r and log r - KL disagree in sign).
    exact = (batch.advantages * log_r.detach() > 0) & (kl.detach() > threshold)
    assert not torch.equal(exact, masked)


def test_extreme_log_ratios_give_finite_losses_and_gradients():
    # Masked (DPPO) and clipped (GRPO) entries with r = exp(+-1000) contribute nothing and
    # must not turn the gradient into NaN.
    batch, _ = make_batch(n=4, shape=(8,), scale=0.0, seed=26, dtype=torch.float32)
    s = batch.std
    push = torch.tensor([1.0, -1.0, 1.0, -1.0]).view(-1, 1)
    x_next = batch.mean_old + push * 60 * s  # x' far along the move: log r = +1600 for all
    mean = (batch.mean_old + push * 40 * s).requires_grad_(True)
    extreme = dataclasses.replace(batch, x_next=x_next, mean=mean,
                                  advantages=torch.tensor([1.0, 0.5, 2.0, 1.0]))
    for name, kw in [("dppo", {"threshold": 1e-7}), ("grpo", {}), ("guard", {"clip_range": 1e-3})]:
        loss, _ = run(name, extreme, **kw)
        (grad,) = torch.autograd.grad(loss, mean)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), name
    assert float(run("dppo", extreme, threshold=1e-7)[1]["mask_frac"]) == 1.0
