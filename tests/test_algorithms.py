"""Likelihood losses (GRPO, CPS, Guard, DPPO): registry, metrics, first update, gradients.

Each check compares with an independent computation from ``algo_helpers`` (the SPEC §3
formulas written directly) or with a hand count.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from algo_helpers import elementwise_reduce, make_batch, ref_kl, ref_log_prob, ref_log_ratio, run
from flowdppo.algorithms import ALGORITHMS, PolicyStepBatch, get_algorithm

LIKELIHOOD = [
    ("grpo", {}), ("grpo", {"reduce": "sum", "clip_range": 1e-2}), ("cps", {}),
    ("cps", {"log_prob_norm": "full"}), ("guard", {}), ("dppo", {}),
    ("dppo", {"reduce": "sum", "threshold": 1e-5}), ("dppo", {"divergence": "tv", "threshold": 1e-3}),
    ("dppo", {"mask": "predictive"}),
]
COMMON = {"loss_policy", "loss_kl_ref", "ratio_mean", "ratio_std", "ratio_min", "ratio_max",
          "kl_old_new_mean", "kl_old_new_max", "approx_kl", "adv_mean"}
CLIP = {"clip_frac", "clip_frac_high", "clip_frac_low"}
MASK = {"mask_frac", "mask_frac_pos", "mask_frac_neg"}


def _ids(params):
    return [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for n, o in params]


def test_registry_kinds_dynamics_and_paper_defaults():
    assert {"grpo", "cps", "guard", "dppo", "nft"} <= set(ALGORITHMS)
    expected = {
        "grpo": ("likelihood", "flow_sde", {"clip_range": 1e-4, "reduce": "mean", "beta": 0.0}),
        "cps": ("likelihood", "cps", {"clip_range": 1e-4, "log_prob_norm": "simple",
                                      "reduce": "mean", "beta": 0.0}),
        "guard": ("likelihood", "flow_sde", {"clip_range": 4e-6, "reduce": "mean", "beta": 0.0}),
        "dppo": ("likelihood", "flow_sde", {"threshold": 1e-7, "divergence": "kl", "reduce": "mean",
                                            "mask": "exact", "beta": 0.0}),
        "nft": ("forward", "ode", {"beta": 1.0, "adv_max": 5.0, "weighting": "x0_adaptive",
                                   "kl_beta": 0.0}),
    }
    for name, (kind, dynamics, defaults) in expected.items():
        spec = get_algorithm(name)
        assert (spec.kind, spec.default_dynamics) == (kind, dynamics)
        assert dataclasses.asdict(spec.make_hparams()) == defaults
    with pytest.raises(ValueError, match=r"did you mean 'threshold'"):
        get_algorithm("dppo").make_hparams(treshold=1e-5)


@pytest.mark.parametrize("name,overrides", LIKELIHOOD, ids=_ids(LIKELIHOOD))
def test_first_update_has_ratio_one_and_zero_divergence(name, overrides):
    batch, _ = make_batch(dtype=torch.float32, same_mean=True)
    _, metrics = run(name, batch, **overrides)
    for key in ("ratio_mean", "ratio_min", "ratio_max"):
        assert float(metrics[key]) == 1.0, key
    for key in ("ratio_std", "kl_old_new_max", "approx_kl", "mask_frac", "clip_frac",
                "tv_old_new_max"):
        if key in metrics:
            assert float(metrics[key]) == 0.0, key


@pytest.mark.parametrize("name,overrides", LIKELIHOOD, ids=_ids(LIKELIHOOD))
@pytest.mark.parametrize("with_ref", [False, True])
def test_metrics_are_the_documented_detached_float32_scalars(name, overrides, with_ref):
    batch, _ = make_batch(n=16, scale=0.05, with_ref=with_ref, dtype=torch.bfloat16)
    loss, metrics = run(name, batch, **overrides)
    expected = set(COMMON) | (MASK if name == "dppo" else CLIP)
    expected |= {"kl_ref_mean"} if with_ref else set()
    expected |= {"tv_old_new_mean", "tv_old_new_max"} if overrides.get("divergence") == "tv" else set()
    expected |= {"ratio_hat_min", "ratio_hat_max"} if name == "guard" else set()
    assert set(metrics) == expected
    assert loss.shape == () and loss.dtype == torch.float32 and loss.requires_grad
    for key, value in metrics.items():
        assert value.shape == () and value.dtype == torch.float32 and not value.requires_grad, key
        assert torch.isfinite(value), key
    for key in MASK | CLIP:
        if key in metrics:
            assert 0.0 <= float(metrics[key]) <= 1.0


@pytest.mark.parametrize("name", ["grpo", "dppo"])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_ratio_and_kl_metrics_match_independent_values(name, reduce):
    batch, _ = make_batch(n=12, scale=0.05, seed=3)
    _, metrics = run(name, batch, reduce=reduce)
    mean = batch.mean.detach()
    log_r = ref_log_ratio(batch, mean, reduce)
    r = log_r.exp()
    kl = ref_kl(batch.mean_old, mean, batch.std, reduce)
    expected = {"ratio_mean": r.mean(), "ratio_min": r.min(), "ratio_max": r.max(),
                "ratio_std": r.std(correction=0), "kl_old_new_mean": kl.mean(),
                "kl_old_new_max": kl.max(), "approx_kl": ((r - 1) - log_r).mean(),
                "adv_mean": batch.advantages.mean()}
    for key, value in expected.items():
        torch.testing.assert_close(metrics[key], value.float(), rtol=1e-5, atol=1e-7, msg=key)


GRADIENT_CASES = [("grpo", {}), ("grpo", {"reduce": "sum"}), ("dppo", {}),
                  ("dppo", {"mask": "predictive", "threshold": 0.0}),
                  ("dppo", {"divergence": "tv", "threshold": 0.0}), ("cps", {"log_prob_norm": "full"})]


@pytest.mark.parametrize("name,overrides", GRADIENT_CASES, ids=_ids(GRADIENT_CASES))
def test_gradient_at_ratio_one_is_the_plain_policy_gradient(name, overrides):
    batch, _ = make_batch(n=10, same_mean=True, seed=4)
    loss, _ = run(name, batch, **overrides)
    (grad,) = torch.autograd.grad(loss, batch.mean)
    mean = batch.mean.detach().clone().requires_grad_(True)
    log_p = ref_log_prob(batch.x_next, mean, batch.std, overrides.get("reduce", "mean"))
    (expected,) = torch.autograd.grad(-(batch.advantages * log_p).mean(), mean)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)
    assert float(expected.abs().max()) > 0


def test_cps_simple_log_prob_gradient_at_ratio_one():
    batch, _ = make_batch(n=10, same_mean=True, seed=5)
    loss, _ = run("cps", batch)
    (grad,) = torch.autograd.grad(loss, batch.mean)
    mean = batch.mean.detach().clone().requires_grad_(True)
    log_p = -elementwise_reduce((batch.x_next - mean) ** 2, "mean")  # the published form
    (expected,) = torch.autograd.grad(-(batch.advantages * log_p).mean(), mean)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)


def test_grpo_clip_zeroes_gradients_and_counts_clipped_entries():
    eps = 0.05
    batch, _ = make_batch(n=60, shape=(4,), scale=0.08, seed=6)
    loss, metrics = run("grpo", batch, clip_range=eps)
    (grad,) = torch.autograd.grad(loss, batch.mean)
    r = ref_log_ratio(batch, batch.mean.detach()).exp()
    a = batch.advantages
    high, low = (a > 0) & (r > 1 + eps), (a < 0) & (r < 1 - eps)
    assert high.any() and low.any() and not (high | low).all()  # the case exercises all branches
    assert float(metrics["clip_frac"]) == pytest.approx(float((high | low).double().mean()))
    assert float(metrics["clip_frac_high"]) == pytest.approx(float(high.double().mean()))
    assert float(metrics["clip_frac_low"]) == pytest.approx(float(low.double().mean()))
    row_norm = grad.flatten(1).norm(dim=1)
    assert torch.all(row_norm[high | low] == 0) and torch.all(row_norm[~(high | low)] > 0)
    expected = -torch.minimum(r * a, r.clamp(1 - eps, 1 + eps) * a).mean()
    torch.testing.assert_close(loss.detach(), expected)


def test_cps_simple_and_full_log_prob_both_available_and_differ():
    batch, _ = make_batch(n=10, scale=0.05, seed=7)
    mean, a = batch.mean.detach(), batch.advantages
    log_r_full = ref_log_ratio(batch, mean)
    # Published Flow-CPS: log p = -mean((x' - mu)^2), no 1/(2 s^2), no constants.
    log_r_simple = (elementwise_reduce((batch.x_next - batch.mean_old) ** 2, "mean")
                    - elementwise_reduce((batch.x_next - mean) ** 2, "mean"))
    s2 = batch.std.flatten() ** 2
    torch.testing.assert_close(log_r_simple, 2 * s2 * log_r_full)  # as documented
    loss_full, _ = run("cps", batch, log_prob_norm="full", clip_range=10.0)  # clip never binds
    loss_simple, _ = run("cps", batch, log_prob_norm="simple", clip_range=10.0)
    torch.testing.assert_close(loss_full.detach(), -(log_r_full.exp() * a).mean())
    torch.testing.assert_close(loss_simple.detach(), -(log_r_simple.exp() * a).mean())
    assert abs(float(loss_full.detach() - loss_simple.detach())) > 1e-6


def _guard_reference(batch: PolicyStepBatch, eps: torch.Tensor, mean: torch.Tensor, reduce="mean"):
    """GRPO-Guard's normalised log-ratio as ``reduce(eps * d)`` and its ``1/dt`` weights."""
    log_r_hat = elementwise_reduce(eps * (mean - batch.mean_old), reduce)
    w = (1 / batch.dt) / (1 / batch.dt).mean()
    return log_r_hat, w


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_guard_normalised_ratio_is_eps_dot_d_with_inverse_dt_weights(reduce):
    batch, eps = make_batch(n=9, scale=0.05, seed=8)
    loss, metrics = run("guard", batch, clip_range=1.0, reduce=reduce)  # clip never binds
    log_r_hat, w = _guard_reference(batch, eps, batch.mean.detach(), reduce)
    a = batch.advantages
    torch.testing.assert_close(loss.detach(), -(w * log_r_hat.exp() * a).mean())
    torch.testing.assert_close(metrics["ratio_hat_min"], log_r_hat.exp().min().float())
    torch.testing.assert_close(metrics["ratio_hat_max"], log_r_hat.exp().max().float())
    # The gradient keeps the KL term's: it is the gradient of the independent formula.
    (grad,) = torch.autograd.grad(loss, batch.mean)
    mean = batch.mean.detach().clone().requires_grad_(True)
    log_r_hat, _ = _guard_reference(batch, eps, mean, reduce)
    (expected,) = torch.autograd.grad(-(w * log_r_hat.exp() * a).mean(), mean)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)


def test_guard_clip_acts_on_the_normalised_ratio():
    clip = 4e-3
    batch, eps = make_batch(n=40, scale=0.05, seed=9)
    _, metrics = run("guard", batch, clip_range=clip)
    r_hat = _guard_reference(batch, eps, batch.mean.detach())[0].exp()
    a = batch.advantages
    clipped = ((a > 0) & (r_hat > 1 + clip)) | ((a < 0) & (r_hat < 1 - clip))
    assert 0 < int(clipped.sum()) < len(a)
    assert float(metrics["clip_frac"]) == pytest.approx(float(clipped.double().mean()))


def test_guard_shift_is_per_sample():
    adv = torch.zeros(5, dtype=torch.float64)
    adv[0] = 1.0
    batch, _ = make_batch(n=5, scale=0.05, seed=10, advantages=adv)
    loss, _ = run("guard", batch, clip_range=1.0)
    moved = batch.mean.detach().clone()
    moved[1:] += 3.0  # other samples' means move far; sample 0's r_hat must not change
    other = dataclasses.replace(batch, mean=moved)
    loss_other, _ = run("guard", other, clip_range=1.0)
    assert float(loss.detach()) == float(loss_other.detach())
    # The 1/dt weights are normalised to mean 1: scaling every dt leaves the loss unchanged.
    scaled = dataclasses.replace(batch, dt=batch.dt * 7.0)
    torch.testing.assert_close(run("guard", scaled, clip_range=1.0)[0], loss)


@pytest.mark.parametrize("name", ["grpo", "cps", "guard", "dppo"])
def test_reference_kl_term(name):
    beta = 0.3
    batch, _ = make_batch(n=8, scale=0.05, seed=11, with_ref=True)
    loss0, _ = run(name, batch, beta=0.0)
    loss, metrics = run(name, batch, beta=beta)
    kl_ref = ref_kl(batch.mean.detach(), batch.mean_ref, batch.std, "mean")
    torch.testing.assert_close(loss - loss0, beta * kl_ref.mean())
    torch.testing.assert_close(metrics["kl_ref_mean"], kl_ref.mean().float())
    torch.testing.assert_close(metrics["loss_kl_ref"], (beta * kl_ref.mean()).float())
    (grad_diff,) = torch.autograd.grad(loss - loss0, batch.mean)
    mean = batch.mean.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(beta * ref_kl(mean, batch.mean_ref, batch.std, "mean").mean(), mean)
    torch.testing.assert_close(grad_diff, expected)
    no_ref = dataclasses.replace(batch, mean_ref=None)
    with pytest.raises(ValueError, match=r"beta=0.3 > 0 needs batch.mean_ref"):
        run(name, no_ref, beta=beta)


@pytest.mark.parametrize("name", ["grpo", "cps", "guard", "dppo"])
def test_likelihood_losses_reject_bad_input(name):
    batch, _ = make_batch(n=4)
    with pytest.raises(ValueError, match=r"reduce='max'"):
        run(name, batch, reduce="max")
    with pytest.raises(ValueError, match=r"batch.advantages has shape \(3,\); expected \(4,\)"):
        run(name, dataclasses.replace(batch, advantages=batch.advantages[:3]))
    with pytest.raises(ValueError, match=r"batch.mean_old has shape"):
        run(name, dataclasses.replace(batch, mean_old=batch.mean_old[:, :1]))
    with pytest.raises(ValueError, match=r"batch.std has shape"):
        run(name, dataclasses.replace(batch, std=batch.std.flatten()))
    with pytest.raises(ValueError, match=r"beta=-1"):
        run(name, batch, beta=-1.0)
    knob = "threshold" if name == "dppo" else "clip_range"
    with pytest.raises(ValueError, match=knob):
        run(name, batch, **{knob: -1e-4})


def test_method_specific_errors():
    batch, _ = make_batch(n=4)
    with pytest.raises(ValueError, match=r"clip_range=0"):
        run("grpo", batch, clip_range=0.0)
    with pytest.raises(ValueError, match=r"log_prob_norm='gauss'"):
        run("cps", batch, log_prob_norm="gauss")
    with pytest.raises(ValueError, match=r"divergence='js'"):
        run("dppo", batch, divergence="js")
    with pytest.raises(ValueError, match=r"mask='soft'"):
        run("dppo", batch, mask="soft")
    with pytest.raises(ValueError, match=r"TV is a probability"):
        run("dppo", batch, divergence="tv", threshold=1.0)
    with pytest.raises(ValueError, match=r"dt must be > 0"):
        run("guard", dataclasses.replace(batch, dt=torch.zeros_like(batch.dt)))
