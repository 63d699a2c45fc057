"""``train.old_means``: the old means recorded by the rollout, or replayed by the update's forward.

On a GPU the rollout's no-grad forward and the update's grad-mode forward (separate
torch.compile graphs, other batch shapes, bf16) round differently, so the first step's KL is
not 0. The model here imitates that: its no-grad velocity is off by a tiny constant.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_overrides
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


def test_replay_removes_a_rollout_forward_mismatch(tiny_base, tmp_path):
    recorded = _trainer(tiny_base, tmp_path, "rollout")
    _perturb_no_grad_forward(recorded)
    row = recorded.iteration(0)
    assert row["kl_old_new_mean"] > 0 and row["ratio_max"] > row["ratio_min"]

    replayed = _trainer(tiny_base, tmp_path, "replay")
    _perturb_no_grad_forward(replayed)
    row = replayed.iteration(0)
    assert row["kl_old_new_mean"] == 0.0 and row["ratio_max"] == row["ratio_min"] == 1.0


def test_auto_replays_only_where_the_forwards_can_differ(tiny_base, tmp_path):
    assert not _trainer(tiny_base, tmp_path, "auto").replay_old_means  # CPU, fp32, eager
    assert _trainer(tiny_base, tmp_path, "auto", "model.compile=true", name="c").replay_old_means
    forward = load_config(str(RECIPES / "toy_nft.yaml"), [*tiny_overrides(tiny_base),
                                                          "train.old_means=replay"])
    from flowdppo.trainer.loop import Trainer

    # Forward-process methods have no recorded means: the option does nothing there.
    assert not Trainer(resolve(forward), tmp_path / "nft").replay_old_means
