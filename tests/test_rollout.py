"""Rollout and replay plumbing on a fake linear model (independent of diffusers)."""

from __future__ import annotations

import torch

from fake_model import FakeFlowModel
from flowdppo.algorithms import get_algorithm
from flowdppo.dynamics import get_dynamics
from flowdppo.trainer.batches import BatchSource, entries_for, likelihood_batch
from flowdppo.trainer.metrics import weighted_mean
from flowdppo.trainer.rollout import NoiseSource, Rollout, choose_window, sample_rollout

PROMPTS = ["a", "bb", "ccc", "dddd", "eeeee", "ffffff"]


def _rollout(model, steps, noise, prompts=PROMPTS, dynamics="flow_sde"):
    dyn = get_dynamics(dynamics)
    return sample_rollout(model, dyn, model.encode_prompts(prompts), model.sigmas(6), noise, steps)


def test_noise_of_a_row_does_not_depend_on_the_split():
    full = NoiseSource(seed=3, stream=5, global_batch=6, start=0, stop=6)
    whole = full.draw(2, (1, 2, 2), torch.device("cpu"))
    parts = torch.cat([full.slice(0, 2).draw(2, (1, 2, 2), torch.device("cpu")),
                       NoiseSource(3, 5, 6, 2, 6).draw(2, (1, 2, 2), torch.device("cpu"))])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, full.draw(3, (1, 2, 2), torch.device("cpu")))


def test_chunked_rollout_equals_one_batch():
    model = FakeFlowModel()
    noise = NoiseSource(0, 1, 6, 0, 6)
    one = _rollout(model, [1, 2], noise)
    chunks = Rollout.cat([_rollout(model, [1, 2], noise.slice(0, 4), PROMPTS[:4]),
                          _rollout(model, [1, 2], noise.slice(4, 6), PROMPTS[4:])])
    for name in ("latents", "x_t", "x_next", "mean_old", "std", "t", "t_next"):
        torch.testing.assert_close(getattr(one, name), getattr(chunks, name))


def test_record_holds_only_the_window_and_steps_outside_are_euler():
    model = FakeFlowModel()
    noise = NoiseSource(0, 1, 6, 0, 6)
    rollout = _rollout(model, [2, 3], noise)
    assert rollout.x_t.shape == (6, 2, 1, 2, 2)
    sigmas = model.sigmas(6)
    torch.testing.assert_close(rollout.t[0], sigmas[2:4].float())
    # x_next of step 2 is the x_t of step 3: the trajectory is continuous.
    torch.testing.assert_close(rollout.x_next[:, 0], rollout.x_t[:, 1])
    # With no trained step the rollout is the Euler ODE.
    ode = _rollout(model, [], noise)
    x = noise.draw(0, model.latent_shape, torch.device("cpu"))
    cond = model.encode_prompts(PROMPTS)
    with torch.no_grad():
        for i in range(6):
            t = torch.full((6,), float(sigmas[i]))
            x = x - model.predict_velocity(x, t, cond) * float(sigmas[i] - sigmas[i + 1])
    torch.testing.assert_close(ode.latents, x)


def test_window_lies_in_its_range():
    gen = torch.Generator().manual_seed(0)
    starts = {choose_window(gen, 3, 1, 6)[0] for _ in range(200)}
    assert starts == {1, 2, 3}


def test_first_replay_has_ratio_one_and_zero_kl():
    model = FakeFlowModel()
    dyn = get_dynamics("flow_sde")
    rollout = _rollout(model, [0, 1, 2], NoiseSource(0, 1, 6, 0, 6))
    cond = model.encode_prompts(PROMPTS)
    adv = torch.linspace(-1, 1, 6)
    batch = likelihood_batch(model, dyn, rollout, adv, cond, entries_for(torch.arange(6), 3), 1.0)
    _, metrics = get_algorithm("dppo")(batch, get_algorithm("dppo").make_hparams())
    assert abs(float(metrics["ratio_max"]) - 1) < 1e-6 and abs(float(metrics["ratio_min"]) - 1) < 1e-6
    assert float(metrics["kl_old_new_max"]) < 1e-12


def _updater(model, spec, hparams, micro_batch_size):
    import contextlib

    from accelerate import Accelerator

    from flowdppo.trainer.update import Updater, UpdateSettings

    params = dict(model.transformer.named_parameters())
    optimizer = torch.optim.SGD(list(params.values()), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    settings = UpdateSettings(1, 1, micro_batch_size, 0.0, False, 0.0, "mean")
    accelerator = Accelerator(cpu=True)
    accelerator.no_sync = lambda module: contextlib.nullcontext()
    return Updater(accelerator, model, optimizer, scheduler, params, spec, hparams, settings)


def test_micro_batched_gradient_equals_the_full_batch_gradient():
    """The trainer's optimizer step (Updater.step): accumulating over micro-batches of 4
    entries gives the gradient of one 18-entry batch (SGD lr 1: the step is the gradient)."""
    import contextlib

    from flowdppo.trainer.distributed import MinibatchShape

    dyn = get_dynamics("flow_sde")
    spec = get_algorithm("grpo")
    hp = spec.make_hparams(clip_range=10.0)
    entries = entries_for(torch.arange(6), 3)

    def step(micro):
        model = FakeFlowModel()
        rollout = _rollout(model, [0, 1, 2], NoiseSource(0, 1, 6, 0, 6))
        with torch.no_grad():  # move away from the old policy so the loss is not trivial
            model.transformer.lin.weight.add_(0.05)
        before = model.transformer.lin.weight.detach().clone()
        cond = model.encode_prompts(PROMPTS)
        source = BatchSource(model, dyn, rollout, cond, torch.linspace(-1, 1, 6), 1.0,
                             contextlib.nullcontext)
        shape = MinibatchShape(-(-len(entries) // micro), len(entries))
        metrics = _updater(model, spec, hp, micro).step(source, entries, shape)
        return before - model.transformer.lin.weight.detach(), metrics

    full, m_full = step(18)
    micro, m_micro = step(4)
    torch.testing.assert_close(full, micro, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(m_full["ratio_max"][0], m_micro["ratio_max"][0])


def test_combine_metrics_weights_means_and_keeps_extremes():
    parts = [(1, {"a": torch.tensor(1.0), "r_min": torch.tensor(0.5), "r_max": torch.tensor(2.0)}),
             (3, {"a": torch.tensor(3.0), "r_min": torch.tensor(0.7), "r_max": torch.tensor(1.0)})]
    out = weighted_mean(parts)
    assert float(out["a"]) == 2.5 and float(out["r_min"]) == 0.5 and float(out["r_max"]) == 2.0


def test_combine_metrics_skips_undefined_values():
    parts = [(1, {"corr": torch.tensor(float("nan"))}), (3, {"corr": torch.tensor(0.5)})]
    assert float(weighted_mean(parts)["corr"]) == 0.5
    assert torch.isnan(weighted_mean(parts[:1])["corr"])


def test_random_sde_steps_are_distinct_in_range_and_reproducible():
    from flowdppo.trainer.rollout import choose_random_steps, choose_sde_steps

    gen = torch.Generator().manual_seed(0)
    draws = [choose_random_steps(gen, 3, 0, 5) for _ in range(300)]
    assert all(len(set(d)) == 3 and d == sorted(d) and d[0] >= 0 and d[-1] < 5 for d in draws)
    assert {0, 2, 4} in [set(d) for d in draws]  # non-consecutive sets occur (a window cannot)
    assert len({tuple(d) for d in draws}) == 10  # every 3-subset of 0..4 is reachable
    again = torch.Generator().manual_seed(0)
    assert [choose_sde_steps(again, "random", 3, 0, 5) for _ in range(300)] == draws


def test_the_plan_depends_only_on_seed_and_iteration():
    """What makes a resumed run (or another process) draw the same prompts and SDE steps."""

    from flowdppo.config import RunConfig, resolve
    from flowdppo.prompts import PromptItem
    from flowdppo.trainer.rollout import make_plan

    cfg = RunConfig()
    cfg.sampling.sde_steps.mode = "random"
    run = resolve(cfg)
    prompts = [PromptItem(p) for p in PROMPTS]
    plans = [make_plan(cfg, run.sde_steps, prompts, it) for it in range(6)]
    again = [make_plan(cfg, run.sde_steps, prompts, it) for it in (5, 4, 3, 2, 1, 0)][::-1]
    assert [p.trained_steps for p in plans] == [p.trained_steps for p in again]
    assert [p.prompts for p in plans] == [p.prompts for p in again]
    assert len({tuple(p.trained_steps) for p in plans}) > 1  # redrawn every iteration
    assert all(len(set(p.trained_steps)) == 3 and max(p.trained_steps) < 5 for p in plans)
