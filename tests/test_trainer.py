"""The training loop end to end on the toy world, with a tiny random base (no pretraining).

Checks: every method's recipe runs 2 iterations and trains every LoRA parameter; a hard
kill between checkpoints then ``--resume`` reproduces the uninterrupted run's metrics step
for step; a failed checkpoint write leaves the previous one intact; non-finite rewards
raise or are dropped and counted; bad input fails before any model loads.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fast_runs import tiny_overrides
from flowdppo.cli import main
from flowdppo.config import load_config, resolve
from flowdppo.rewards import register_reward
from flowdppo.trainer.commands import RECIPES

METHOD_RECIPES = sorted(p.stem for p in RECIPES.glob("toy_*.yaml") if "video" not in p.stem)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("recipe", METHOD_RECIPES)
def test_every_method_recipe_trains_two_iterations(recipe, tiny_base, tmp_path):
    from flowdppo.trainer.loop import Trainer

    out = tmp_path / recipe
    cfg = load_config(str(RECIPES / f"{recipe}.yaml"), tiny_overrides(tiny_base))
    trainer = Trainer(resolve(cfg), out)
    before = {n: p.detach().clone() for n, p in trainer.params.items()}
    trainer.run()
    # The last SD3 block discards its text stream, so its text-query projection gets no
    # gradient by construction; every other LoRA weight must have moved.
    last = len(trainer.model.transformer.transformer_blocks) - 1
    dead = f"transformer_blocks.{last}.attn.add_q_proj."
    unchanged = [n for n, p in trainer.params.items()
                 if torch.equal(before[n], p.detach()) and not n.startswith(dead)]
    assert not unchanged, f"{recipe}: parameters did not change: {unchanged[:3]}"
    rows = read_rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("reward_mean", "reward_std", "reward_digit_label", "loss", "time_rollout_s",
                    "time_update_s", "grad_norm"):
            assert math.isfinite(row[key]), (recipe, key, row[key])
    if trainer.resolved.algorithm.kind == "likelihood":
        # (r == 1 at the first update is checked in test_rollout.py; here the second
        # optimizer step of each rollout is off-policy, so r spreads around 1.)
        assert rows[0]["ratio_min"] <= 1.0 <= rows[0]["ratio_max"]
        assert "kl_old_new_mean" in rows[0] and rows[0]["kl_unit"] == "mean"
    evals = read_rows(out / "eval.jsonl")
    assert [r["step"] for r in evals] == [0, 1, 2]
    assert evals[0]["kl_ref"] == pytest.approx(0.0, abs=1e-12)  # the base is the reference
    assert evals[-1]["kl_ref"] > 0
    assert {"judge_acc", "diversity"} <= set(evals[-1]) or any("judge" in k for k in evals[-1])
    assert (out / "config.yaml").is_file() and list((out / "samples").glob("*.png"))
    assert list((out / "tensorboard").glob("events.*"))
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert (ckpt / "lora" / "pytorch_lora_weights.safetensors").is_file()


def _train_subprocess(args: list[str], env_extra: dict[str, str] | None = None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "flowdppo.cli", "train", *args],
                          capture_output=True, text=True, env=env, timeout=600)


def _strip_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


@pytest.mark.parametrize("extra", [[], ["train.policy_lag=2"]], ids=["on_policy", "lag_2"])
def test_killed_run_resumes_to_the_uninterrupted_metrics(tiny_base, tmp_path, extra):
    # lag_2: the policies of the last iterations (which sample the next rollouts) come back too.
    overrides = [*tiny_overrides(tiny_base, iterations=4), "checkpoint.every=2", "eval.every=2",
                 "sampling.num_groups=2", *extra]
    full = _train_subprocess(["--output-dir", str(tmp_path / "full"), *overrides])
    assert full.returncode == 0, full.stderr[-2000:]
    # Hard exit (no cleanup, like SIGKILL) right after iteration 3 is logged: between the
    # checkpoints of iterations 2 and 4.
    killed = _train_subprocess(["--output-dir", str(tmp_path / "cut"), *overrides],
                               {"FLOWDPPO_TEST_EXIT_AFTER_ITERATION": "3"})
    assert killed.returncode == 137
    assert len(read_rows(tmp_path / "cut" / "metrics.jsonl")) == 3
    resumed = _train_subprocess(["--resume", str(tmp_path / "cut")])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for name in ("metrics.jsonl", "eval.jsonl"):
        expected = _strip_times(read_rows(tmp_path / "full" / name))
        got = _strip_times(read_rows(tmp_path / "cut" / name))
        assert got == expected, name


def test_a_failed_checkpoint_write_keeps_the_previous_one(tiny_base, tmp_path, monkeypatch):
    from flowdppo.trainer import checkpoint
    from flowdppo.trainer.loop import Trainer

    cfg = load_config(str(RECIPES / "toy_dppo.yaml"), tiny_overrides(tiny_base, iterations=1))
    trainer = Trainer(resolve(cfg), tmp_path)
    trainer.run()
    root = tmp_path / "checkpoints"
    good = (root / "latest").read_text()
    saved = dict(checkpoint.load_checkpoint(root / good).trainable)

    def broken_save(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint, "save_file", broken_save)  # the first file a checkpoint writes
    with pytest.raises(OSError, match="disk full"):
        trainer.save(2)
    assert (root / "latest").read_text() == good
    reloaded = checkpoint.load_checkpoint(root / good).trainable
    assert all(torch.equal(saved[k], reloaded[k]) for k in saved)


@register_reward("test_sometimes_nan")
def _sometimes_nan(device: str = "cpu"):
    def reward(images, prompts, metadata):
        values = images.flatten(1).mean(1)
        values[0] = float("nan")
        return values, {}

    return reward


def test_nonfinite_rewards_raise_or_are_dropped_and_counted(tiny_base, tmp_path):
    from flowdppo.trainer.loop import Trainer

    base = [*tiny_overrides(tiny_base, iterations=1), "rewards.items=[{name: test_sometimes_nan}]",
            "eval.at_start=false"]
    trainer = Trainer(resolve(load_config(str(RECIPES / "toy_dppo.yaml"), base)), tmp_path / "a")
    with pytest.raises(ValueError, match="non-finite rewards from \\['test_sometimes_nan'\\]"):
        trainer.run()
    cfg = load_config(str(RECIPES / "toy_dppo.yaml"), [*base, "rewards.nonfinite=drop"])
    row = Trainer(resolve(cfg), tmp_path / "b").iteration(0)
    assert row["reward_num_nonfinite"] == 1 and math.isfinite(row["reward_mean"])


def test_bad_input_fails_fast_with_the_field_named(tmp_path, capsys):
    assert main(["train", "--output-dir", str(tmp_path / "x"), "sampling.group_size=1"]) == 2
    assert "`sampling.group_size`=1" in capsys.readouterr().err
    assert main(["train", "--output-dir", str(tmp_path / "x"), "algorithm.hparams.treshold=1"]) == 2
    assert "did you mean `threshold`" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "missing")]) == 2
    assert "no run there" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing was written


def test_sample_and_eval_commands_read_a_finished_run(tiny_base, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--output-dir", str(out), *tiny_overrides(tiny_base, iterations=1)]) == 0
    grid = tmp_path / "seven"
    assert main(["sample", "--run", str(out), "--prompt", "a handwritten seven", "--num", "2",
                 "--out", str(grid)]) == 0
    assert (grid / "grid.png").is_file() and len(list(grid.glob("p00_s*.png"))) == 2
    result = tmp_path / "eval.json"
    assert main(["eval", "--run", str(out), "--output", str(result)]) == 0
    row = json.loads(result.read_text())
    logged = read_rows(out / "eval.jsonl")[-1]
    # The same checkpoint, prompts and evaluation noise give the logged numbers again.
    assert row["reward_mean"] == pytest.approx(logged["reward_mean"], abs=1e-5)
    assert row["kl_ref"] == pytest.approx(logged["kl_ref"], rel=1e-4)
    capsys.readouterr()
    assert main(["sample", "--run", str(out), "--checkpoint", str(tmp_path / "nope"),
                 "--prompt", "a handwritten seven"]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err


def test_full_fine_tuning_trains_every_weight_against_a_frozen_reference(tiny_base, tmp_path):
    from flowdppo.trainer.loop import Trainer

    cfg = load_config(str(RECIPES / "toy_dppo.yaml"),
                      [*tiny_overrides(tiny_base, iterations=1), "lora.enabled=false",
                       "optim.lr=1e-3", "algorithm.hparams.beta=0.01"])
    trainer = Trainer(resolve(cfg), tmp_path)
    assert len(trainer.params) == len(list(trainer.model.transformer.parameters()))
    trainer.run()
    evals = read_rows(tmp_path / "eval.jsonl")
    assert evals[0]["kl_ref"] == 0.0 and evals[-1]["kl_ref"] > 0
    assert "kl_ref_mean" in read_rows(tmp_path / "metrics.jsonl")[0]


def test_sigterm_between_iterations_checkpoints_that_iteration_and_stops(tiny_base, tmp_path):
    """A preemption (SIGTERM) lets the iteration in flight finish, writes its checkpoint even
    when none is due, and stops; `--resume` continues from it."""
    import signal

    from flowdppo.trainer.interrupt import Interrupted
    from flowdppo.trainer.loop import Trainer

    cfg = load_config(str(RECIPES / "toy_dppo.yaml"),
                      [*tiny_overrides(tiny_base, iterations=5), "checkpoint.every=100",
                       "eval.every=0", "eval.at_start=false"])
    trainer = Trainer(resolve(cfg), tmp_path / "run")
    iteration = trainer.iteration

    def preempted(it):
        row = iteration(it)
        if it == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return row

    trainer.iteration = preempted
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted):
        trainer.run()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert len(read_rows(tmp_path / "run" / "metrics.jsonl")) == 2
    assert signal.getsignal(signal.SIGTERM) == handler_before  # handlers restored


def test_a_run_whose_every_reward_is_nan_stops_after_max_empty_iterations(tiny_base, tmp_path):
    from flowdppo.errors import RewardsExhaustedError
    from flowdppo.trainer.loop import Trainer

    @register_reward("test_all_nan")
    def _all_nan(device: str = "cpu"):
        return lambda images, prompts, metadata: (torch.full((len(prompts),), float("nan")), {})

    cfg = load_config(str(RECIPES / "toy_dppo.yaml"),
                      [*tiny_overrides(tiny_base, iterations=10), "rewards.nonfinite=drop",
                       "rewards.max_empty_iterations=2", "eval.every=0", "eval.at_start=false",
                       "rewards.items=[{name: test_all_nan}]", "checkpoint.every=100"])
    trainer = Trainer(resolve(cfg), tmp_path / "run")
    with pytest.raises(RewardsExhaustedError, match="last 2 iterations"):
        trainer.run()
    assert len(read_rows(tmp_path / "run" / "metrics.jsonl")) == 2
