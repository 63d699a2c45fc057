"""DiffusionNFT's loss against closed forms derived by hand and a per-sample numpy loop.

Velocity weighting, one sample, free ``v`` (D elements), ``r = clip(A / A_max / 2 + 1/2, 0, 1)``:
``L(v) = r |beta v + (1-beta) v_old - v*|^2 / D + (1-r) |(1+beta) v_old - beta v - v*|^2 / D``.
``dL/dv = 0`` gives ``beta v = (2r - 1) v* + (1 + beta - 2r) v_old``, i.e.
``v_min = v_old + (2r - 1) / beta (v* - v_old) = v_old + A / (A_max beta) (v* - v_old)``
(for ``|A| <= A_max``); ``L`` is a convex quadratic (Hessian ``2 beta^2 / D I``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from algo_helpers import run
from flowdppo.algorithms import VelocityBatch


def _batch(n=1, dim=5, *, adv=(1.0,), seed=0, dtype=torch.float64, with_ref=False, v=None):
    g = torch.Generator().manual_seed(seed)
    kw = {"generator": g, "dtype": torch.float64}
    x0, eps, v_old = (torch.randn(n, dim, **kw) for _ in range(3))
    t = 0.1 + 0.8 * torch.rand(n, **kw)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    v = (v_old if v is None else v).clone().to(dtype).requires_grad_(True)
    v_ref = v_old + 0.1 * torch.randn(n, dim, **kw) if with_ref else None
    return VelocityBatch(v=v, v_old=v_old.to(dtype), v_target=(eps - x0).to(dtype), x_t=x_t.to(dtype),
                         t=t.to(dtype), advantages=torch.tensor(adv, dtype=dtype),
                         v_ref=None if v_ref is None else v_ref.to(dtype)), x0


@pytest.mark.parametrize("adv", [2.5, -2.5, 5.0, -1.0, 0.0, 9.0])
@pytest.mark.parametrize("beta", [1.0, 0.5, 2.0])
def test_velocity_loss_minimiser_is_the_hand_derived_closed_form(adv, beta):
    batch, _ = _batch(adv=(adv,), seed=1)
    v_old, target = batch.v_old, batch.v_target
    r = min(max(adv / 5.0 / 2 + 0.5, 0.0), 1.0)
    v_min = v_old + (2 * r - 1) / beta * (target - v_old)
    at_min = dataclasses.replace(batch, v=v_min.clone().requires_grad_(True))
    loss, _ = run("nft", at_min, beta=beta, weighting="velocity")
    (grad,) = torch.autograd.grad(loss, at_min.v)
    assert float(grad.abs().max()) < 1e-12
    # Gradient descent from v_old (lr below 1 / Hessian) converges to it.
    v = v_old.clone().requires_grad_(True)
    lr = 0.5 * 5 / (2 * beta**2)
    for _ in range(60):
        loss, _ = run("nft", dataclasses.replace(batch, v=v), beta=beta, weighting="velocity")
        (g,) = torch.autograd.grad(loss, v)
        v = (v - lr * g).detach().requires_grad_(True)
    torch.testing.assert_close(v.detach(), v_min, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("weighting", ["velocity", "x0_adaptive"])
def test_a_few_steps_move_v_along_the_advantage_sign(weighting):
    for adv, closer in [(3.0, True), (-3.0, False)]:
        batch, _ = _batch(adv=(adv,), seed=2)
        v = batch.v_old.clone().requires_grad_(True)
        for _ in range(3):
            loss, _ = run("nft", dataclasses.replace(batch, v=v), weighting=weighting)
            (g,) = torch.autograd.grad(loss, v)
            v = (v - 0.1 * g).detach().requires_grad_(True)
        before = (batch.v_old - batch.v_target).norm()
        after = (v.detach() - batch.v_target).norm()
        assert bool(after < before) == closer, adv


def _x0_adaptive_reference(batch, x0, beta, adv_max):
    """Per-sample numpy loop: x0-space squared error over its mean absolute error."""
    v, v_old = batch.v.detach().numpy(), batch.v_old.numpy()
    x_t, t, a = batch.x_t.numpy(), batch.t.numpy(), batch.advantages.numpy()
    x0 = x0.numpy()
    total = 0.0
    for i in range(len(a)):
        r = np.clip(a[i] / adv_max / 2 + 0.5, 0, 1)
        loss_i = 0.0
        for weight, u in [(r, beta * v[i] + (1 - beta) * v_old[i]),
                          (1 - r, (1 + beta) * v_old[i] - beta * v[i])]:
            err = (x_t[i] - t[i] * u) - x0[i]
            loss_i += weight * np.mean(err**2) / max(np.mean(np.abs(err)), 1e-5)
        total += loss_i
    return total / len(a)


def test_x0_adaptive_loss_matches_a_per_sample_reference():
    g = torch.Generator().manual_seed(3)
    v = torch.randn(4, 6, generator=g, dtype=torch.float64)
    batch, x0 = _batch(n=4, dim=6, adv=(2.0, -1.0, 7.0, 0.0), seed=3, v=v)
    loss, metrics = run("nft", batch, beta=0.7, adv_max=5.0)
    assert float(loss.detach()) == pytest.approx(_x0_adaptive_reference(batch, x0, 0.7, 5.0), rel=1e-12)
    r = np.clip(np.array([2.0, -1.0, 7.0, 0.0]) / 10 + 0.5, 0, 1)
    assert float(metrics["optimality_prob_mean"]) == pytest.approx(r.mean(), rel=1e-6)
    delta = ((v - batch.v_old) ** 2).mean(1).mean()
    assert float(metrics["v_delta_norm"]) == pytest.approx(float(delta), rel=1e-6)


def test_x0_adaptive_gradient_at_the_old_policy_is_the_closed_form():
    # At v = v_old both implicit policies equal v_old, so the detached weights are equal and
    # dL/dv = (2r - 1) beta 2 t^2 (v_old - v*) / (D mean|t (v_old - v*)|).
    batch, _ = _batch(adv=(2.0,), seed=4)
    loss, _ = run("nft", batch, beta=1.0)
    (grad,) = torch.autograd.grad(loss, batch.v)
    t, diff = batch.t[0], batch.v_old - batch.v_target
    r = 2.0 / 10 + 0.5
    expected = (2 * r - 1) * 2 * t**2 * diff / (5 * (t * diff).abs().mean())
    torch.testing.assert_close(grad, expected)


def test_reference_term_and_metric():
    batch, _ = _batch(n=3, adv=(1.0, -2.0, 0.5), seed=5, with_ref=True,
                      v=torch.randn(3, 5, dtype=torch.float64))
    loss0, metrics = run("nft", batch)
    loss, _ = run("nft", batch, kl_beta=0.2)
    kl = ((batch.v.detach() - batch.v_ref) ** 2).mean(1).mean()
    torch.testing.assert_close(loss - loss0, 0.2 * kl)
    torch.testing.assert_close(metrics["kl_ref_mean"], kl.float())
    assert set(metrics) == {"loss_policy", "optimality_prob_mean", "v_delta_norm", "kl_ref_mean"}
    for value in metrics.values():
        assert value.shape == () and value.dtype == torch.float32 and not value.requires_grad


def test_low_precision_input_computes_in_float32():
    batch, _ = _batch(n=2, adv=(1.0, -1.0), seed=6, dtype=torch.bfloat16)
    loss, _ = run("nft", batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_nft_rejects_bad_input():
    batch, _ = _batch(n=2, adv=(1.0, -1.0), seed=7)
    with pytest.raises(ValueError, match=r"kl_beta=0.1 > 0 needs batch.v_ref"):
        run("nft", batch, kl_beta=0.1)
    with pytest.raises(ValueError, match=r"weighting='x0'"):
        run("nft", batch, weighting="x0")
    with pytest.raises(ValueError, match=r"beta=0"):
        run("nft", batch, beta=0.0)
    with pytest.raises(ValueError, match=r"adv_max=-1"):
        run("nft", batch, adv_max=-1.0)
    with pytest.raises(ValueError, match=r"batch.v_old has shape"):
        run("nft", dataclasses.replace(batch, v_old=batch.v_old[:, :2]))
    with pytest.raises(ValueError, match=r"batch.t has shape \(1,\); expected \(2,\)"):
        run("nft", dataclasses.replace(batch, t=batch.t[:1]))
