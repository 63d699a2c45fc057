"""Run directories: unique by default, never mixed, overwritten only on purpose, and every
fault around them (a run that died early, a torn log line, a file or unwritable folder,
a full disk, a changed config on resume) ends in one clear line with nothing lost."""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from flowdppo.cli import main
from flowdppo.config import ConfigError, load_config, resolve
from flowdppo.errors import RemoteRewardError
from flowdppo.rewards import register_reward
from flowdppo.trainer import checkpoint, run_dir
from flowdppo.trainer.logging import truncate_jsonl


def tiny(base: Path, iterations: int = 2, *extra: str) -> list[str]:
    """A seconds-long toy run on ``base`` (a checkpoint every iteration)."""
    return [f"model.pretrained={base}", f"train.num_iterations={iterations}",
            "sampling.num_steps=4", "sampling.sde_steps.count=2", "sampling.sde_steps.range=[0.0, 0.75]",
            "sampling.group_size=3", "sampling.num_groups=2", "sampling.eval_num_steps=3",
            "eval.max_prompts=2", "eval.samples_per_prompt=2", "eval.every=1", "eval.monitors=[]",
            "checkpoint.every=1", "logging.progress_bar=false", "logging.tensorboard=false",
            "optim.lr=0.05", "device=cpu", *extra]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steps(path: Path) -> list[int]:
    return [r["step"] for r in rows(path)]


@pytest.fixture(scope="module")
def finished_run(tiny_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--output-dir", str(out), *tiny(tiny_base)]) == 0
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


# -- a run that died before its first checkpoint ----------------------------------------------

FAIL = {"after_calls": None, "calls": 0}  # fail every call after that many (None: never)


@register_reward("test_flaky")
def _flaky(device: str = "cpu"):
    def reward(images, prompts, metadata):
        FAIL["calls"] += 1
        if FAIL["after_calls"] is not None and FAIL["calls"] > FAIL["after_calls"]:
            raise RemoteRewardError("remote reward http://127.0.0.1:1/score failed (simulated)")
        return images.flatten(1).mean(1), {}

    return reward


def test_a_run_that_died_before_its_first_checkpoint_restarts(tiny_base, tmp_path, capsys,
                                                              monkeypatch):
    out = tmp_path / "run"
    args = tiny(tiny_base, 2, "checkpoint.every=5", "rewards.items=[{name: test_flaky}]")
    monkeypatch.setitem(FAIL, "after_calls", 1)  # the base's evaluation works, iteration 1 fails
    monkeypatch.setitem(FAIL, "calls", 0)
    assert main(["train", "--output-dir", str(out), *args]) == 1
    err = capsys.readouterr().err
    assert "No checkpoint was written before the failure" in err and "from step 0" in err
    assert "are kept" not in err and "Traceback" not in err
    assert steps(out / "eval.jsonl") == [0]  # the base's evaluation, then the failure
    assert main(["train", "--output-dir", str(out), *args]) == 2  # a plain restart: told how
    assert "stopped before its first checkpoint; --resume restarts it" in capsys.readouterr().err
    monkeypatch.setitem(FAIL, "after_calls", None)
    assert main(["train", "--resume", str(out)]) == 0
    assert steps(out / "metrics.jsonl") == [1, 2]
    assert steps(out / "eval.jsonl") == [0, 1, 2]  # not 0, 0, 1, 2


def test_a_failure_after_a_checkpoint_says_where_to_continue(tmp_path):
    (tmp_path / "checkpoints" / "step_000003").mkdir(parents=True)
    assert "up to step 3 are kept; continue with `flowdppo train --resume" in (
        run_dir.resume_hint(tmp_path))


# -- torn or damaged log lines ------------------------------------------------------------------


def test_a_torn_last_log_line_is_skipped_with_a_warning(finished_run, tmp_path, caplog):
    run = copy_run(finished_run, tmp_path)
    for name in ("metrics.jsonl", "eval.jsonl"):
        with open(run / name, "a") as handle:
            handle.write('{"step": 3, "reward_mean": 0.1')  # the disk filled mid-line
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--resume", str(run), "train.num_iterations=3"]) == 0
    assert re.search(r"metrics\.jsonl: dropping its torn last line \d+", caplog.text)
    assert re.search(r"eval\.jsonl: dropping its torn last line \d+", caplog.text)
    assert steps(run / "metrics.jsonl") == [1, 2, 3]


def test_a_damaged_middle_log_line_is_an_error_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: not a JSON row"):
        truncate_jsonl(path, 3)


# -- directories that are not (or not only) this run ------------------------------------------


def test_a_folder_that_is_not_a_run_is_refused(tiny_base, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("mine")
    assert main(["train", "--output-dir", str(out), *tiny(tiny_base, 1)]) == 2
    assert "is not empty and holds no run" in capsys.readouterr().err
    assert main(["train", "--output-dir", str(out), "--overwrite", *tiny(tiny_base, 1)]) == 2
    assert "holds files no run writes (todo.txt)" in capsys.readouterr().err
    assert (out / "todo.txt").read_text() == "mine"


def test_a_run_without_its_config_is_refused_then_overwritten(finished_run, tiny_base, tmp_path,
                                                              capsys):
    run = copy_run(finished_run, tmp_path)
    (run / "config.yaml").unlink()
    before = steps(run / "metrics.jsonl")
    assert main(["train", "--output-dir", str(run), *tiny(tiny_base, 1)]) == 2
    assert "not a resumable run" in capsys.readouterr().err
    assert steps(run / "metrics.jsonl") == before  # nothing appended, no checkpoint pruned
    assert (run / "checkpoints" / "step_000002").is_dir()
    assert main(["train", "--output-dir", str(run), "--overwrite", *tiny(tiny_base, 1)]) == 0
    assert steps(run / "metrics.jsonl") == [1]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000001"]


def test_a_finished_run_is_replaced_only_with_overwrite(finished_run, tiny_base, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    assert main(["train", "--output-dir", str(run), *tiny(tiny_base, 1)]) == 2
    assert "already holds a run (its last checkpoint is step 2)" in capsys.readouterr().err
    assert main(["train", "--output-dir", str(run), "--overwrite", *tiny(tiny_base, 1)]) == 0
    assert steps(run / "metrics.jsonl") == [1]


def test_an_output_dir_that_is_a_file_or_unwritable_is_one_line(tiny_base, tmp_path, capsys,
                                                                 monkeypatch):
    target = tmp_path / "a_file"
    target.write_text("x")
    assert main(["train", "--output-dir", str(target), *tiny(tiny_base, 1)]) == 2
    err = capsys.readouterr().err
    assert f"output directory {target} is a file" in err and "Traceback" not in err

    def read_only(*args, **kwargs):  # tests run as root, for whom chmod changes nothing
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(run_dir.tempfile, "mkstemp", read_only)
    assert main(["train", "--output-dir", str(tmp_path / "ro"), *tiny(tiny_base, 1)]) == 2
    err = capsys.readouterr().err
    assert "cannot be written (Permission denied)" in err and "Traceback" not in err


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tiny_base, tmp_path,
                                                                       capsys, monkeypatch):
    real = checkpoint.save_file

    def fills_up(tensors, path, *args, **kwargs):
        if "step_000002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", fills_up)
    out = tmp_path / "run"
    assert main(["train", "--output-dir", str(out), *tiny(tiny_base, 2)]) == 2
    err = capsys.readouterr().err
    assert "no space left on device" in err and "step_000001 is intact" in err
    assert "Traceback" not in err
    root = out / "checkpoints"
    assert (root / "latest").read_text() == "step_000001"
    assert [p.name for p in root.iterdir() if p.name.startswith(".tmp")] == []
    assert checkpoint.load_checkpoint(root / "step_000001").step == 1
    monkeypatch.setattr(checkpoint, "save_file", real)
    assert main(["train", "--resume", str(out)]) == 0
    assert steps(out / "metrics.jsonl") == [1, 2]


# -- what a resume may change ------------------------------------------------------------------


@pytest.mark.parametrize("override, field", [
    ("algorithm.name=grpo", "`algorithm.name` ('dppo' -> 'grpo')"),
    ("algorithm.hparams.threshold=0.5", "`algorithm.hparams.threshold`"),
    ("seed=7", "`seed` (0 -> 7)"),
    ("sampling.num_steps=6", "`sampling.num_steps` (4 -> 6)"),
    ("model.pretrained=elsewhere", "`model.pretrained`"),
    ("lora.rank=4", "`lora.rank` (8 -> 4)"),
])
def test_resume_refuses_a_change_that_redefines_the_run(override, field, finished_run, capsys):
    assert main(["train", "--resume", str(finished_run), override]) == 2
    err = capsys.readouterr().err
    assert "these fields define the run" in err and field in err


def test_resume_records_the_changes_it_allows(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    assert main(["train", "--resume", str(run), "train.num_iterations=3",
                 "logging.progress_bar=true"]) == 0
    (entry,) = rows(run / "resume_overrides.jsonl")
    assert entry["resumed_at_step"] == 2
    assert entry["changes"] == {"train.num_iterations": {"from": 2, "to": 3},
                                "logging.progress_bar": {"from": False, "to": True}}
    assert load_config(str(run / "config.yaml")).train.num_iterations == 3
    assert steps(run / "metrics.jsonl") == [1, 2, 3]


def test_extending_a_decaying_lr_schedule_is_refused():
    saved = {"train": {"num_iterations": 2}, "optim": {"schedule": "cosine"}}
    new = {"train": {"num_iterations": 4}, "optim": {"schedule": "cosine"}}
    with pytest.raises(ValueError, match=r"`optim\.schedule=cosine` LR schedule"):
        run_dir.check_resume_changes(Path("run"), saved, new)
    constant = {"train": {"num_iterations": 4}, "optim": {"schedule": "constant"}}
    assert run_dir.check_resume_changes(Path("run"), {**saved, "optim": constant["optim"]},
                                        constant) == {"train.num_iterations": (2, 4)}


# -- default names and config checks ----------------------------------------------------------


def test_the_default_output_dir_is_unique_per_run(tiny_base, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["train", *tiny(tiny_base, 1)]) == 0
    made = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(made) == 2
    for name in made:
        assert re.fullmatch(r"toy_dppo__seed0__\d{8}-\d{6}(-\d+)?", name), name
        assert (tmp_path / "runs" / name / "config.yaml").is_file()
    assert main(["train", *tiny(tiny_base, 1), "output_dir=runs/mine"]) == 0
    assert (tmp_path / "runs" / "mine" / "config.yaml").is_file()


def test_two_default_dirs_in_the_same_second_differ(tmp_path):
    first = run_dir.default_output_dir("toy_dppo", 0, tmp_path)
    second = run_dir.default_output_dir("toy_dppo", 0, tmp_path)
    assert first != second and second.name == first.name + "-2"


def test_a_multi_process_launch_needs_an_output_dir(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "train.num_iterations=1"]) == 2
    assert "a multi-process launch needs --output-dir" in capsys.readouterr().err


def test_checkpoint_every_zero_is_rejected():
    with pytest.raises(ConfigError, match=r"`checkpoint\.every`=0: must be >= 1"):
        resolve(load_config(None, ["checkpoint.every=0"]))
