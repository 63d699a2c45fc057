"""``train.policy_lag``: rollouts sampled by the policy of k iterations before, as an
asynchronous trainer with bounded staleness would hand them over."""

from __future__ import annotations

import torch

from fast_runs import tiny_overrides
from flowdppo.config import load_config, resolve
from flowdppo.trainer.commands import RECIPES


def _trainer(tiny_base, out, *extra, recipe="toy_dppo.yaml"):
    from flowdppo.trainer.loop import Trainer

    overrides = [*tiny_overrides(tiny_base, iterations=3), "eval.at_start=false",
                 "train.num_updates=1", "train.minibatches_per_pass=1", *extra]
    return Trainer(resolve(load_config(str(RECIPES / recipe), overrides)), out)


def _strip(row):
    return {k: v for k, v in row.items() if not k.startswith("time_")}


def test_lag_zero_is_the_on_policy_run(tiny_base, tmp_path):
    default = _trainer(tiny_base, tmp_path / "default")
    lag0 = _trainer(tiny_base, tmp_path / "lag0", "train.policy_lag=0")
    for it in range(2):
        assert _strip(lag0.iteration(it)) == _strip(default.iteration(it))
    assert not lag0.lag.history


def test_lagged_rollouts_come_from_the_older_policy(tiny_base, tmp_path):
    """With k = 1, iteration 1 samples with theta_0 (the weights before iteration 0's
    update): its latents equal an untrained trainer's rollout of the same iteration, and the
    first update sees a KL > 0 (the live weights already moved)."""
    lagged = _trainer(tiny_base, tmp_path / "lag1", "train.policy_lag=1")
    fresh = _trainer(tiny_base, tmp_path / "fresh")
    first = lagged.iteration(0)
    assert first["kl_old_new_max"] < 1e-10  # theta_0 sampled and theta_0 is live: on policy
    plan = lagged.plan(1)
    lagged.lag.advance()  # what iteration(1) does first
    rollout, _, _ = lagged.rollout(1, plan)
    reference, _, _ = fresh.rollout(1, fresh.plan(1))
    assert torch.equal(rollout.latents, reference.latents)
    assert len(lagged.lag.history) == 2  # theta_0 (sampling now) and theta_1

    stale = _trainer(tiny_base, tmp_path / "stale", "train.policy_lag=1")
    stale.iteration(0)
    row = stale.iteration(1)
    assert row["kl_old_new_mean"] > 0 and row["ratio_max"] > row["ratio_min"]


def test_a_forward_method_samples_with_its_old_policy_of_k_iterations_before(tiny_base, tmp_path):
    """DiffusionNFT samples with its EMA old policy; with k = 1 iteration 1 samples with that
    policy before iteration 0's update (an untrained trainer's rollout), while on-policy it
    samples with the old policy already moved by the update."""
    def second_rollout(trainer, advance_lag):
        trainer.iteration(0)
        if advance_lag:
            trainer.lag.advance()  # what iteration(1) does first
        return trainer.rollout(1, trainer.plan(1))[0].latents

    fresh = _trainer(tiny_base, tmp_path / "fresh", recipe="toy_nft.yaml")
    reference = fresh.rollout(1, fresh.plan(1))[0].latents
    on_policy = second_rollout(_trainer(tiny_base, tmp_path / "lag0", recipe="toy_nft.yaml"), False)
    lagged = second_rollout(_trainer(tiny_base, tmp_path / "lag1", "train.policy_lag=1",
                                     recipe="toy_nft.yaml"), True)
    assert not torch.equal(on_policy, reference)  # the old policy moved after iteration 0
    assert torch.equal(lagged, reference)
