"""Checkpoints never run code when read, name a damaged file, and fall back to an intact one.

A crafted pickle planted as ``rng.pt`` / ``optimizer.pt`` runs nothing, neither on
``--resume`` (refused, with the file named) nor on ``sample`` / ``eval`` (which read only
the weights); a checkpoint of the earlier format still resumes; a damaged latest
checkpoint is named, ``--resume-from`` picks another, and without a choice the previous
complete one is used with a warning.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import flowdppo
from flowdppo.cli import main
from flowdppo.trainer import checkpoint

SRC = Path(flowdppo.__file__).resolve().parent  # the package under test


def tiny(base: Path, iterations: int = 2) -> list[str]:
    """A seconds-long toy run on ``base`` (a checkpoint every iteration, the last two kept)."""
    return [f"model.pretrained={base}", f"train.num_iterations={iterations}",
            "sampling.num_steps=4", "sampling.sde_steps.count=2", "sampling.sde_steps.range=[0.0, 0.75]",
            "sampling.group_size=3", "sampling.num_groups=2", "sampling.eval_num_steps=3",
            "eval.max_prompts=2", "eval.samples_per_prompt=2", "eval.every=1", "eval.monitors=[]",
            "checkpoint.every=1", "logging.progress_bar=false", "logging.tensorboard=false",
            "optim.lr=0.05", "device=cpu"]


@pytest.fixture(scope="module")
def finished_run(tiny_base, tmp_path_factory) -> Path:
    """A 2-iteration run with checkpoints step_000001 and step_000002 (copy before changing)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--output-dir", str(out), *tiny(tiny_base)]) == 0
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class CreatesFile:
    """Unpickling this creates ``path``: the proof that a load ran code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def to_earlier_format(ckpt: Path) -> None:
    """Rewrite a checkpoint as the earlier code wrote it: optimizer.pt and rng.pt (pickles),
    state.json with only step and algorithm."""
    state = checkpoint.load_checkpoint(ckpt)
    torch.save(state.optimizer, ckpt / "optimizer.pt")
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(),
                "torch": torch.get_rng_state()}, ckpt / "rng.pt")
    for name in ("optimizer.json", "optimizer.safetensors", "rng.json"):
        (ckpt / name).unlink()
    (ckpt / "state.json").write_text(json.dumps({"step": state.step, "algorithm": "dppo"}))


def test_no_pickle_loading_anywhere_in_src():
    found = subprocess.run(["grep", "-rn", r"weights_only=False\|pickle.load", str(SRC)],
                           capture_output=True, text=True).stdout
    assert found == ""


def test_checkpoints_hold_no_pickle(finished_run):
    ckpt = finished_run / "checkpoints" / "step_000002"
    names = {p.name for p in ckpt.iterdir()}
    assert {"trainable.safetensors", "optimizer.json", "optimizer.safetensors", "rng.json",
            "state.json"} <= names
    assert not [n for n in names if n.endswith((".pt", ".pkl", ".bin"))]
    state = checkpoint.load_checkpoint(ckpt)
    adam = state.optimizer["optimizer"]
    assert set(adam["state"]) == set(range(len(state.trainable)))  # int keys survive JSON
    assert isinstance(adam["param_groups"][0]["betas"], tuple)
    steps = state.optimizer["scheduler"]["last_epoch"]  # optimizer steps so far
    assert steps >= 2 and int(adam["state"][0]["step"]) == steps


def test_rng_state_round_trips_through_json():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    saved = json.loads(json.dumps(checkpoint.rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    checkpoint.set_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_checkpoint_of_the_earlier_format_still_resumes(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    ckpt = run / "checkpoints" / "step_000002"
    before = checkpoint.load_checkpoint(ckpt)
    to_earlier_format(ckpt)
    legacy = checkpoint.load_checkpoint(ckpt)
    for i, entry in before.optimizer["optimizer"]["state"].items():
        for key, value in entry.items():
            assert torch.equal(legacy.optimizer["optimizer"]["state"][i][key], value)
    random.seed(5)
    assert legacy.rng["python"][1] == list(random.getstate()[1])
    assert main(["train", "--resume", str(run), "train.num_iterations=3"]) == 0
    assert [r["step"] for r in rows(run / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.parametrize("planted", ["rng.pt", "optimizer.pt"])
def test_a_planted_pickle_runs_nothing_on_resume(planted, finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    marker = tmp_path / "pwned"
    for name in ("step_000001", "step_000002"):
        ckpt = run / "checkpoints" / name
        to_earlier_format(ckpt)
        torch.save({"python": CreatesFile(marker)}, ckpt / planted)
    assert main(["train", "--resume", str(run), "train.num_iterations=3"]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert f"step_000002/{planted}: refused to load" in err
    assert "could run code" in err and "it asks to call io.open" in err
    assert "Traceback" not in err
    assert [r["step"] for r in rows(run / "metrics.jsonl")] == [1, 2]  # nothing was changed


def test_sample_and_eval_read_only_the_weights(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    marker = tmp_path / "pwned"
    ckpt = run / "checkpoints" / "step_000002"
    to_earlier_format(ckpt)
    for planted in ("rng.pt", "optimizer.pt"):
        torch.save(CreatesFile(marker), ckpt / planted)
    grid = tmp_path / "samples" / "grid.png"
    assert main(["sample", "--run", str(run), "--prompt", "a handwritten seven", "--num", "1",
                 "--out", str(grid.parent)]) == 0
    assert main(["eval", "--run", str(run), "--output", str(tmp_path / "eval.json")]) == 0
    assert grid.is_file() and not marker.exists()


def damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["trainable.safetensors", "optimizer.safetensors", "rng.json"])
def test_a_damaged_file_is_named(name, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    ckpt = run / "checkpoints" / "step_000002"
    damage(ckpt / name)
    with pytest.raises(checkpoint.CheckpointError, match=f"step_000002/{name}: damaged"):
        checkpoint.load_checkpoint(ckpt)
    (ckpt / name).write_bytes(b"")  # truncated (a torn write): named too
    with pytest.raises(checkpoint.CheckpointError, match=f"step_000002/{name}"):
        checkpoint.load_checkpoint(ckpt)


def test_resume_falls_back_from_a_damaged_latest_checkpoint(finished_run, tmp_path, caplog):
    run = copy_run(finished_run, tmp_path)
    damage(run / "checkpoints" / "step_000002" / "optimizer.safetensors")
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--resume", str(run), "train.num_iterations=3"]) == 0
    assert "step_000002/optimizer.safetensors: damaged" in caplog.text
    assert "resuming from step_000001 instead of step_000002" in caplog.text
    assert [r["step"] for r in rows(run / "metrics.jsonl")] == [1, 2, 3]  # 2 and 3 redone
    assert (run / "checkpoints" / "abandoned-step_000002").is_dir()  # set aside, not deleted


def test_resume_from_picks_a_checkpoint_and_refuses_a_damaged_one(finished_run, tmp_path,
                                                                    capsys):
    run = copy_run(finished_run, tmp_path)
    damage(run / "checkpoints" / "step_000001" / "trainable.safetensors")
    assert main(["train", "--resume", str(run), "--resume-from", "step_1"]) == 2
    assert "step_000001/trainable.safetensors: damaged" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--resume-from", "step_7"]) == 2
    assert "not a checkpoint of this run" in capsys.readouterr().err
    run = copy_run(finished_run, tmp_path / "again")
    assert main(["train", "--resume", str(run), "--resume-from", "1"]) == 0
    assert [r["step"] for r in rows(run / "metrics.jsonl")] == [1, 2]
    assert (run / "checkpoints" / "abandoned-step_000002").is_dir()


def test_the_latest_pointer_missing_or_outside_the_run(finished_run, tmp_path, caplog):
    run = copy_run(finished_run, tmp_path)
    root = run / "checkpoints"
    (root / "latest").unlink()
    with caplog.at_level(logging.WARNING):
        assert checkpoint.latest_checkpoint(root) == root / "step_000002"
    assert "is missing; using the newest complete checkpoint step_000002" in caplog.text
    for outside in ("../../elsewhere", str(tmp_path), "step_000002/../../x"):
        (root / "latest").write_text(outside)
        with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint of this run"):
            checkpoint.latest_checkpoint(root)


def test_a_damaged_earlier_format_file_is_named_without_unsafe_advice(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    ckpt = run / "checkpoints" / "step_000002"
    to_earlier_format(ckpt)
    (ckpt / "optimizer.pt").write_bytes(b"xx")
    with pytest.raises(checkpoint.CheckpointError) as caught:
        checkpoint.load_checkpoint(ckpt)
    assert "step_000002/optimizer.pt: damaged" in str(caught.value)
    assert "weights_only" not in str(caught.value)  # torch's text would suggest =False
