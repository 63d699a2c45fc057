"""Dynamics and Gaussian divergences against independent float64 references (SPEC §2-3).

References are written here from the SPEC text with numpy / scipy / ``math``, per sample,
in a different algebraic form from the library where one exists (Flow-SDE as drift + score
term, CPS through ``x0_hat``/``x1_hat``, log-densities from ``scipy.stats.norm``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from flowdppo.dynamics import gaussian_kl, gaussian_log_prob, gaussian_tv, get_dynamics

SHAPES = [(3, 4), (2, 3, 5), (4, 2, 3, 3)]


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _times(rng: np.random.Generator, b: int, include_one: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample ``t`` in (0.05, 1) and ``t_next`` in (0, t)."""
    t = rng.uniform(0.05, 0.98, size=b)
    if include_one:
        t[0] = 1.0
    t_next = t * rng.uniform(0.3, 0.95, size=b)
    return t, t_next


def _ref_flow_sde(x, v, t, t_next, a):
    """Per sample: drift ``v + sigma^2/(2t) (x + (1 - t) v)`` integrated over ``-dt``."""
    means, stds = np.empty_like(x), np.empty(len(x))
    for i in range(len(x)):
        dt = t[i] - t_next[i]
        denom_t = t_next[i] if t[i] >= 1.0 else t[i]
        sigma = a * math.sqrt(t[i] / (1.0 - denom_t))
        drift = v[i] + sigma**2 / (2 * t[i]) * (x[i] + (1 - t[i]) * v[i])
        means[i] = x[i] - drift * dt
        stds[i] = sigma * math.sqrt(dt)
    return means, stds


def _ref_cps(x, v, t, t_next, eta):
    means, stds = np.empty_like(x), np.empty(len(x))
    for i in range(len(x)):
        x0_hat, x1_hat = x[i] - t[i] * v[i], x[i] + (1 - t[i]) * v[i]
        means[i] = (1 - t_next[i]) * x0_hat + t_next[i] * math.cos(eta * math.pi / 2) * x1_hat
        stds[i] = t_next[i] * math.sin(eta * math.pi / 2)
    return means, stds


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _std_col(std: np.ndarray, ndim: int) -> torch.Tensor:
    return _t(std).view(-1, *([1] * (ndim - 1)))


# ----- means and stds ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("noise_level", [0.7, 1.3])
def test_flow_sde_mean_std_match_reference(shape, noise_level):
    rng = _rng(1)
    x, v = rng.normal(size=shape), rng.normal(size=shape)
    t, t_next = _times(rng, shape[0], include_one=True)
    mean, std = get_dynamics("flow_sde", noise_level=noise_level).mean_std(_t(x), _t(v), _t(t), _t(t_next))
    ref_mean, ref_std = _ref_flow_sde(x, v, t, t_next, noise_level)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(std.flatten().numpy(), ref_std, rtol=1e-12)
    assert std.shape == (shape[0],) + (1,) * (len(shape) - 1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eta", [0.8, 0.3, 1.0])
def test_cps_mean_std_match_reference(shape, eta):
    rng = _rng(2)
    x, v = rng.normal(size=shape), rng.normal(size=shape)
    t, t_next = _times(rng, shape[0])
    mean, std = get_dynamics("cps", eta=eta).mean_std(_t(x), _t(v), _t(t), _t(t_next))
    ref_mean, ref_std = _ref_cps(x, v, t, t_next, eta)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(std.flatten().numpy(), ref_std, rtol=1e-12)


@pytest.mark.parametrize("name,params", [("flow_sde", {"noise_level": 0.7}), ("cps", {"eta": 0.8}),
                                         ("ode", {})])
def test_mean_grad_v_is_the_finite_difference_slope(name, params):
    # The mean is affine in v, so (mean(v + h) - mean(v)) / h is exactly the slope.
    rng = _rng(3)
    x, v, h = rng.normal(size=(5, 6)), rng.normal(size=(5, 6)), rng.normal(size=(5, 6))
    t, t_next = _times(rng, 5)
    dyn = get_dynamics(name, **params)
    m0, _ = dyn.mean_std(_t(x), _t(v), _t(t), _t(t_next))
    m1, _ = dyn.mean_std(_t(x), _t(v + h), _t(t), _t(t_next))
    slope = dyn.mean_grad_v(_t(t), _t(t_next), _t(x))
    np.testing.assert_allclose((m1 - m0).numpy(), (slope * _t(h)).numpy(), rtol=1e-9, atol=1e-12)


def test_zero_noise_is_the_euler_step():
    rng = _rng(4)
    x, v = rng.normal(size=(4, 7)), rng.normal(size=(4, 7))
    t, t_next = _times(rng, 4)
    euler = x - v * (t - t_next)[:, None]
    for name, params in [("flow_sde", {"noise_level": 0.0}), ("cps", {"eta": 0.0}), ("ode", {})]:
        x_next, mean, std = get_dynamics(name, **params).step(_t(x), _t(v), _t(t), _t(t_next))
        np.testing.assert_allclose(mean.numpy(), euler, rtol=1e-12, atol=1e-12)
        assert torch.equal(x_next, mean) and float(std.abs().max()) == 0.0
    # Continuity: a tiny noise level is within O(a^2) of the Euler mean.
    mean, _ = get_dynamics("flow_sde", noise_level=1e-4).mean_std(_t(x), _t(v), _t(t), _t(t_next))
    np.testing.assert_allclose(mean.numpy(), euler, atol=1e-6)
    mean, _ = get_dynamics("cps", eta=1e-4).mean_std(_t(x), _t(v), _t(t), _t(t_next))
    np.testing.assert_allclose(mean.numpy(), euler, atol=1e-6)


def test_flow_sde_at_t_equal_one_is_finite_and_uses_the_next_time():
    x, v = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    mean, std = get_dynamics("flow_sde", noise_level=0.7).mean_std(x, v, 1.0, 0.9)
    assert torch.isfinite(mean).all() and torch.isfinite(std).all()
    # sigma = a sqrt(1 / (1 - 0.9)), s = sigma sqrt(0.1) = a.
    assert float(std[0, 0]) == pytest.approx(0.7, rel=1e-12)


def test_cps_last_step_is_deterministic_and_has_no_log_prob():
    x, v = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    dyn = get_dynamics("cps", eta=0.8)
    x_next, mean, std = dyn.step(x, v, 0.2, 0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x_next, mean) and float(std.abs().max()) == 0.0
    torch.testing.assert_close(mean, x - 0.2 * v)  # x0_hat
    with pytest.raises(ValueError, match=r"std must be > 0"):
        gaussian_log_prob(x_next, mean, std)
    with pytest.raises(ValueError, match=r"std must be > 0"):
        gaussian_kl(mean, mean + 1, std)


# ----- log-prob, KL, TV -------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_log_prob_matches_scipy_and_sum_is_d_times_mean(shape):
    rng = _rng(5)
    x, mu = rng.normal(size=shape), rng.normal(size=shape)
    s = rng.uniform(0.1, 2.0, size=shape[0])
    ref = np.array([stats.norm.logpdf(x[i], mu[i], s[i]).sum() for i in range(shape[0])])
    std = _std_col(s, len(shape))
    got_sum = gaussian_log_prob(_t(x), _t(mu), std, reduce="sum")
    got_mean = gaussian_log_prob(_t(x), _t(mu), std, reduce="mean")
    num_elements = int(np.prod(shape[1:]))
    np.testing.assert_allclose(got_sum.numpy(), ref, rtol=1e-12)
    np.testing.assert_allclose(got_mean.numpy() * num_elements, ref, rtol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_kl_is_the_monte_carlo_free_closed_form_and_symmetric(shape):
    rng = _rng(6)
    mu_p, mu_q = rng.normal(size=shape), rng.normal(size=shape)
    s = rng.uniform(0.1, 2.0, size=shape[0])
    # KL of two Gaussians with covariances s^2 I, general formula specialised per sample:
    # 0.5 [tr(S^-1 S) + (m_q - m_p)^T S^-1 (m_q - m_p) - D + ln det S / det S].
    ref = np.array([0.5 * (np.sum((mu_q[i] - mu_p[i]) ** 2) / s[i] ** 2) for i in range(shape[0])])
    std = _std_col(s, len(shape))
    kl_sum = gaussian_kl(_t(mu_p), _t(mu_q), std, reduce="sum")
    np.testing.assert_allclose(kl_sum.numpy(), ref, rtol=1e-12)
    np.testing.assert_allclose(gaussian_kl(_t(mu_q), _t(mu_p), std, "sum").numpy(), ref, rtol=1e-12)
    kl_mean = gaussian_kl(_t(mu_p), _t(mu_q), std, reduce="mean")
    np.testing.assert_allclose(kl_mean.numpy() * np.prod(shape[1:]), ref, rtol=1e-12)


def test_flow_sde_kl_in_terms_of_velocity_difference():
    rng = _rng(7)
    b, a = 6, 0.7
    x, v_old, v_new = (rng.normal(size=(b, 8)) for _ in range(3))
    t, t_next = _times(rng, b)
    dyn = get_dynamics("flow_sde", noise_level=a)
    mu_old, std = dyn.mean_std(_t(x), _t(v_old), _t(t), _t(t_next))
    mu_new, _ = dyn.mean_std(_t(x), _t(v_new), _t(t), _t(t_next))
    kl = gaussian_kl(mu_old, mu_new, std, reduce="sum").numpy()
    for i in range(b):
        dt, sigma = t[i] - t_next[i], a * math.sqrt(t[i] / (1 - t[i]))
        closed = dt / 2 * (sigma * (1 - t[i]) / (2 * t[i]) + 1 / sigma) ** 2
        assert kl[i] == pytest.approx(closed * np.sum((v_new[i] - v_old[i]) ** 2), rel=1e-10)


def test_cps_kl_in_terms_of_velocity_difference():
    rng = _rng(8)
    b, eta = 6, 0.8
    x, v_old, v_new = (rng.normal(size=(b, 8)) for _ in range(3))
    t, t_next = _times(rng, b)
    dyn = get_dynamics("cps", eta=eta)
    mu_old, std = dyn.mean_std(_t(x), _t(v_old), _t(t), _t(t_next))
    mu_new, _ = dyn.mean_std(_t(x), _t(v_new), _t(t), _t(t_next))
    kl = gaussian_kl(mu_old, mu_new, std, reduce="sum").numpy()
    angle = eta * math.pi / 2
    for i in range(b):
        c = -(1 - t_next[i]) * t[i] + t_next[i] * (1 - t[i]) * math.cos(angle)
        closed = c**2 / (2 * t_next[i] ** 2 * math.sin(angle) ** 2)
        assert kl[i] == pytest.approx(closed * np.sum((v_new[i] - v_old[i]) ** 2), rel=1e-10)


@pytest.mark.parametrize("scale", [1e-6, 1e-2, 0.3, 3.0])
def test_tv_matches_the_normal_cdf_formula_and_pinsker(scale):
    rng = _rng(9)
    mu_p = rng.normal(size=(5, 3, 4))
    mu_q = mu_p + scale * rng.normal(size=(5, 3, 4))
    s = rng.uniform(0.2, 1.5, size=5)
    tv = gaussian_tv(_t(mu_p), _t(mu_q), _std_col(s, 3)).numpy()
    for i in range(5):
        z = np.linalg.norm(mu_p[i] - mu_q[i]) / (2 * s[i])
        # 2 Phi(z) - 1 loses precision for tiny z; erf(z / sqrt 2) is the same number.
        ref = 2 * stats.norm.cdf(z) - 1 if z > 1e-3 else math.erf(z / math.sqrt(2))
        assert tv[i] == pytest.approx(ref, rel=1e-9, abs=1e-15)
    kl_sum = gaussian_kl(_t(mu_p), _t(mu_q), _std_col(s, 3), reduce="sum").numpy()
    assert np.all(tv <= np.sqrt(kl_sum / 2) + 1e-15)
    assert np.all((tv >= 0) & (tv <= 1))


# ----- Monte-Carlo ------------------------------------------------------------------------


@pytest.mark.parametrize("name,params", [("flow_sde", {"noise_level": 0.7}), ("cps", {"eta": 0.8})])
def test_step_samples_have_the_stated_mean_and_variance(name, params):
    n, elems = 20000, 3
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(1, elems, dtype=torch.float64, generator=gen).expand(n, elems)
    v = torch.randn(1, elems, dtype=torch.float64, generator=gen).expand(n, elems)
    x_next, mean, std = get_dynamics(name, **params).step(x, v, 0.6, 0.45, generator=gen)
    s = float(std[0, 0])
    emp_mean, emp_var = x_next.mean(0), x_next.var(0)
    # Standard errors: s / sqrt(n) for the mean, s^2 sqrt(2 / (n - 1)) for the variance.
    assert torch.all((emp_mean - mean[0]).abs() < 4 * s / math.sqrt(n))
    assert torch.all((emp_var - s**2).abs() < 4 * s**2 * math.sqrt(2 / (n - 1)))


@pytest.mark.parametrize("name,params", [("flow_sde", {"noise_level": 0.7}), ("cps", {"eta": 0.8})])
def test_log_ratio_mean_is_minus_kl_and_variance_twice_kl(name, params):
    n, elems = 20000, 16
    gen = torch.Generator().manual_seed(11)
    dyn = get_dynamics(name, **params)
    x = torch.randn(1, elems, dtype=torch.float64, generator=gen).expand(n, elems)
    v_old = torch.randn(1, elems, dtype=torch.float64, generator=gen).expand(n, elems)
    v_new = v_old + 0.5 * torch.randn(1, elems, dtype=torch.float64, generator=gen)
    x_next, mu_old, std = dyn.step(x, v_old, 0.7, 0.6, generator=gen)  # drawn from the old policy
    mu_new, _ = dyn.mean_std(x, v_new, 0.7, 0.6)
    log_r = gaussian_log_prob(x_next, mu_new, std, "sum") - gaussian_log_prob(x_next, mu_old, std, "sum")
    kl = float(gaussian_kl(mu_old[:1], mu_new[:1], std[:1], "sum"))
    assert 0.05 < kl < 5  # a regime where both moments are measurable
    assert abs(float(log_r.mean()) + kl) < 4 * math.sqrt(2 * kl / n)
    assert abs(float(log_r.var()) - 2 * kl) < 4 * 2 * kl * math.sqrt(2 / (n - 1))


# ----- errors -----------------------------------------------------------------------------


def test_dynamics_reject_bad_input():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"unknown dynamics 'flow_sd'.*did you mean 'flow_sde'"):
        get_dynamics("flow_sd")
    with pytest.raises(ValueError, match=r"noise_level"):
        get_dynamics("flow_sde", noise_level=-0.1)
    with pytest.raises(ValueError, match=r"eta"):
        get_dynamics("cps", eta=1.5)
    with pytest.raises(ValueError, match=r"bad parameters"):
        get_dynamics("cps", noise_level=0.7)
    dyn = get_dynamics("flow_sde")
    with pytest.raises(ValueError, match=r"shape"):
        dyn.mean_std(x, torch.zeros(2, 4), 0.5, 0.4)
    with pytest.raises(ValueError, match=r"t_next=0.6 must be smaller"):
        dyn.mean_std(x, x, 0.5, 0.6)
    with pytest.raises(ValueError, match=r"times must lie in"):
        dyn.mean_std(x, x, 1.5, 0.4)
    with pytest.raises(ValueError, match=r"one time per sample"):
        dyn.mean_std(x, x, torch.full((3,), 0.5), 0.4)


def test_gaussians_reject_bad_input():
    x = torch.zeros(2, 3)
    std = torch.ones(2, 1)
    with pytest.raises(ValueError, match=r"reduce='max'"):
        gaussian_log_prob(x, x, std, reduce="max")
    with pytest.raises(ValueError, match=r"reduce='max'"):
        gaussian_kl(x, x, std, reduce="max")
    with pytest.raises(ValueError, match=r"must match"):
        gaussian_kl(x, torch.zeros(2, 4), std)
    with pytest.raises(ValueError, match=r"must match"):
        gaussian_tv(x, torch.zeros(3, 3), std)
    with pytest.raises(ValueError, match=r"std must be > 0"):
        gaussian_log_prob(x, x, -std)
    with pytest.raises(ValueError, match=r"does not broadcast"):
        gaussian_kl(x, x, torch.ones(3, 1))
