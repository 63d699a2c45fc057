"""``train.old_means``: the old means recorded by the rollout, or replayed by the update's forward.

On a GPU the rollout's no-grad forward and the update's grad-mode forward (separate
torch.compile graphs, other batch shapes, bf16) round differently, so the first step's KL is
not 0. The model here imitates that: its no-grad velocity is off by a tiny constant.
"""

from __future__ import annotations

import pytest
import torch

from fast_runs import tiny_overrides
from flowdppo.config import load_config, resolve
from flowdppo.trainer.commands import RECIPES


def _trainer(tiny_base, tmp_path, old_means: str, *extra: str, name: str = ""):
    from flowdppo.trainer.loop import Trainer

    overrides = [*tiny_overrides(tiny_base, iterations=1), "eval.at_start=false",
                 "train.num_updates=1", "train.minibatches_per_pass=1",
                 f"train.old_means={old_means}", *extra]
    cfg = load_config(str(RECIPES / "toy_dppo.yaml"), overrides)
    return Trainer(resolve(cfg), tmp_path / (name or old_means))


def _perturb_no_grad_forward(trainer, offset: float = 1e-3) -> None:
    predict = trainer.model.predict_velocity

    def predict_velocity(*args, **kwargs):
        v = predict(*args, **kwargs)
        return v if torch.is_grad_enabled() else v + offset

    trainer.model.predict_velocity = predict_velocity


@pytest.mark.parametrize("old_means", ["rollout", "replay"])
def test_identical_forwards_give_zero_first_step_kl_either_way(tiny_base, tmp_path, old_means):
    row = _trainer(tiny_base, tmp_path, old_means).iteration(0)
    # One pass, one optimizer step: every entry is scored before the weights move.
    assert row["kl_old_new_mean"] == 0.0 and row["ratio_max"] == row["ratio_min"] == 1.0


def test_first_step_is_exact_even_when_the_rollout_forward_differs(tiny_base, tmp_path):
    """The first optimizer step's own forward defines the old means of its entries: a rollout
    forward that rounds differently cannot make r != 1 there, in either mode."""
    for mode in ("rollout", "replay"):
        trainer = _trainer(tiny_base, tmp_path, mode, name=f"one_{mode}")
        _perturb_no_grad_forward(trainer)
        row = trainer.iteration(0)
        assert row["kl_old_new_mean"] == 0.0 and row["ratio_max"] == row["ratio_min"] == 1.0


def test_replay_removes_a_rollout_forward_mismatch(tiny_base, tmp_path):
    """Later minibatches of the first pass: with weights that (nearly) do not move, the
    rollout's perturbed means show as a KL; replayed ones by the update's forward do not."""
    extra = ("train.minibatches_per_pass=2", "optim.lr=1e-30")
    recorded = _trainer(tiny_base, tmp_path, "rollout", *extra, name="two_rollout")
    _perturb_no_grad_forward(recorded)
    row = recorded.iteration(0)
    assert row["kl_old_new_max"] > 1e-9 and row["ratio_max"] > row["ratio_min"]

    replayed = _trainer(tiny_base, tmp_path, "replay", *extra, name="two_replay")
    _perturb_no_grad_forward(replayed)
    row = replayed.iteration(0)
    assert row["kl_old_new_max"] < 1e-12


def test_auto_replays_only_where_the_forwards_can_differ(tiny_base, tmp_path):
    assert not _trainer(tiny_base, tmp_path, "auto").resolved.replay_old_means  # CPU, fp32, eager
    assert _trainer(tiny_base, tmp_path, "auto", "model.compile=true", name="c").resolved.replay_old_means
    forward = load_config(str(RECIPES / "toy_nft.yaml"), [*tiny_overrides(tiny_base),
                                                          "train.old_means=replay"])
    from flowdppo.trainer.loop import Trainer

    # Forward-process methods have no recorded means: the option does nothing there.
    assert not Trainer(resolve(forward), tmp_path / "nft").resolved.replay_old_means


@pytest.mark.slow
def test_compiled_bf16_first_step_kl_is_zero_only_with_replay(tmp_path):
    """The real case, on CPU: torch.compile's no-grad (rollout) and grad-mode (update) graphs
    of the tiny SD3 transformer round differently under bf16 autocast (seen on an H200 too)."""
    import json
    import os
    import subprocess
    import sys

    def first_row(old_means: str) -> dict:
        out = tmp_path / old_means
        args = [sys.executable, "-m", "flowdppo.cli", "train", "--config", "tiny_sd3",
                "--output-dir", str(out), "device=cpu", "mixed_precision=bf16",
                "model.compile=true", "train.num_iterations=1", "eval.at_start=false",
                f"train.old_means={old_means}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])

    recorded, replayed = first_row("rollout"), first_row("replay")
    assert recorded["kl_old_new_mean"] > 0 and recorded["ratio_max"] > recorded["ratio_min"]
    assert replayed["kl_old_new_mean"] == 0.0 and replayed["ratio_max"] == replayed["ratio_min"] == 1.0


def test_reference_means_batched_after_the_rollout_equal_the_inline_ones(tiny_base, tmp_path):
    """beta > 0: the reference means computed after the rollout, over (sample, step) entries,
    equal a forward of the reference at each step during sampling."""
    import dataclasses

    from flowdppo.trainer.rollout import NoiseSource, sample_rollout

    trainer = _trainer(tiny_base, tmp_path, "rollout", "algorithm.hparams.beta=0.01",
                       "train.micro_batch_size=5")  # chunks that straddle samples
    assert trainer.resolved.needs_reference_means
    # Move the policy off the reference (the base), so the two means differ.
    with torch.no_grad():
        for p in trainer.params.values():
            p.add_(0.05 * torch.randn_like(p))
    plan = trainer.plan(0)
    cond = trainer.model.encode_prompts(plan.prompts)
    noise = NoiseSource(trainer.cfg.seed, 0, len(plan.prompts), 0, len(plan.prompts))
    inline = sample_rollout(trainer.model, trainer.dynamics, cond, trainer.sigmas, noise,
                            plan.trained_steps, reference=trainer.reference)
    zeros = torch.zeros(len(plan.prompts))
    batched = trainer._reference_means(trainer.batch_source(
        0, dataclasses.replace(inline, mean_ref=None), cond, zeros, plan))
    torch.testing.assert_close(batched.mean_ref, inline.mean_ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(batched.mean_ref, batched.mean_old)
