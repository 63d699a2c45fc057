"""Two processes over gloo (torchrun, CPU) train exactly like one process with the same
global batch: rewards and group statistics are gathered, rollout noise is keyed per global
sample, DDP averages gradients and metrics are reduced across processes. Processes that drop
different numbers of images (non-finite rewards) still run the same collectives."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from fast_runs import tiny_overrides

LAUNCH = str(Path(__file__).with_name("launch_flowdppo.py"))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _run(prefix: list[str], out: Path, overrides: list[str], timeout: float = 600,
         **env: str) -> None:
    """``flowdppo train`` through tests/launch_flowdppo.py (test hooks set by ``env``); a
    hang fails the test after ``timeout`` seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    proc = subprocess.Popen([*prefix, LAUNCH, "train", "--config", "toy_dppo",
                             "--output-dir", str(out), *overrides], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts each worker in a session of its own: kill them one by one, or they
        # keep the output pipes (and this test) open.
        for child in [*psutil.Process(proc.pid).children(recursive=True), proc]:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                child.kill()
        proc.communicate()
        raise AssertionError(f"no exit within {timeout} s (processes out of step?)") from None
    assert proc.returncode == 0, stderr[-3000:]


def _close(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=2e-4, abs_tol=1e-6) or (math.isnan(a) and math.isnan(b))
    return a == b


def test_two_gloo_processes_equal_one_process(tiny_base, tmp_path):
    # Groups of 4 over 2 processes of 6 images each: the second group spans both.
    overrides = [*tiny_overrides(tiny_base, iterations=2), "sampling.group_size=4",
                 "sampling.num_groups=3", "train.minibatches_per_pass=1", "checkpoint.every=2"]
    _run([sys.executable], tmp_path / "one", overrides)
    _run(TORCHRUN, tmp_path / "two", overrides)
    _assert_same_rows(tmp_path / "one", tmp_path / "two", evals=3)


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes_equal_one_process(tiny_base, tmp_path):
    """The same under `accelerate launch` (on the CPU `--cpu` would run one process;
    `--multi_gpu --num_processes 2` gives two gloo processes)."""
    overrides = [*tiny_overrides(tiny_base, iterations=2), "sampling.group_size=4",
                 "sampling.num_groups=3", "train.minibatches_per_pass=1", "checkpoint.every=2"]
    _run([sys.executable], tmp_path / "one", overrides)
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                  "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", "--main_process_port", "29517"]
    _run(accelerate, tmp_path / "two", overrides, timeout=300)
    _assert_same_rows(tmp_path / "one", tmp_path / "two", evals=3)


def _assert_same_rows(one_dir: Path, two_dir: Path, evals: int, metric_keys=None) -> None:
    """metrics.jsonl (``metric_keys`` only, if given) and eval.jsonl agree row by row."""
    for name in ("metrics.jsonl", "eval.jsonl"):
        one, two = _rows(one_dir / name), _rows(two_dir / name)
        assert len(one) == len(two) == (2 if name == "metrics.jsonl" else evals)
        for row_one, row_two in zip(one, two):
            keys = [k for k in row_one if not k.startswith("time_") and k != "num_processes"]
            if name == "metrics.jsonl":
                assert (row_one["num_processes"], row_two["num_processes"]) == (1, 2)
            if name == "metrics.jsonl" and metric_keys is not None:
                keys = [k for k in keys if k in metric_keys or k.startswith("reward_")]
            bad = {k: (row_one[k], row_two.get(k)) for k in keys if not _close(row_one[k], row_two.get(k))}
            assert not bad, f"{name} step {row_one['step']}: {bad}"


def _group_prompts(overrides: list[str], iterations: int) -> list[list[str]]:
    """The prompt of every group of each iteration, from the trainer's own plan."""
    from flowdppo.config import load_config, resolve
    from flowdppo.trainer import setup
    from flowdppo.trainer.commands import RECIPES
    from flowdppo.trainer.loop import Trainer

    cfg = load_config(str(RECIPES / "toy_dppo.yaml"),
                      [o for o in overrides if not o.startswith("rewards.")])  # test rewards
    stub = SimpleNamespace(cfg=cfg, prompts=setup.load_prompts(cfg), resolved=resolve(cfg))
    size = cfg.sampling.group_size
    return [Trainer.plan(stub, it).prompts[::size] for it in range(iterations)]


def _nan_setup(overrides: list[str], nan_groups: list[list[int]]) -> tuple[list[str], dict]:
    """A seed whose prompts of ``nan_groups[it]`` (the groups made NaN in iteration ``it``)
    occur in no other group of those iterations, the overrides with it and the hook's env."""
    for seed in range(100):
        seeded = [*overrides, f"seed={seed}"]
        plans = _group_prompts(seeded, len(nan_groups))
        nan = {plan[g] for plan, groups in zip(plans, nan_groups) for g in groups}
        kept = {p for plan, groups in zip(plans, nan_groups)
                for g, p in enumerate(plan) if g not in groups}
        if not nan & kept:
            return seeded, {"FLOWDPPO_TEST_NAN_PROMPTS": json.dumps(sorted(nan))}
    raise AssertionError("no seed below 100 separates the prompts")


def test_uneven_nonfinite_drops_keep_processes_in_step(tiny_base, tmp_path):
    """Rank 1 drops 4 of its 6 images in iteration 1 and all 6 in iteration 2, so it has
    fewer micro-batches than rank 0 (padded with zero-weighted ones) or none (an update of
    padding only). The run finishes (a desync hangs until the timeout), and since each step's
    gradient is that of the mean over all kept entries, parameters, gradient norms and
    evaluations equal those of one process."""
    overrides = [*tiny_overrides(tiny_base, iterations=2), "sampling.group_size=4",
                 "sampling.num_groups=3", "train.minibatches_per_pass=1",
                 "train.micro_batch_size=4", "checkpoint.every=2", "eval.at_start=false",
                 "rewards.items=[{name: test_nan_prompts}]", "rewards.nonfinite=drop"]
    # Rank 0 holds group 0 and half of group 1, rank 1 the other half and group 2.
    overrides, env = _nan_setup(overrides, [[2], [1, 2]])
    _run([sys.executable], tmp_path / "one", overrides, **env)
    _run(TORCHRUN, tmp_path / "two", overrides, timeout=180, **env)
    rows = _rows(tmp_path / "two" / "metrics.jsonl")
    assert [r["reward_num_nonfinite"] for r in rows] == [4, 8]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    # Update metrics such as the loss are per-process means averaged over processes (they
    # differ from one process when the processes kept different numbers of entries).
    _assert_same_rows(tmp_path / "one", tmp_path / "two", evals=2,
                      metric_keys={"step", "grad_norm", "lr", "images_generated"})


@pytest.mark.slow
def test_a_process_with_fewer_samples_than_minibatches_keeps_in_step(tiny_base, tmp_path):
    """Three minibatches per pass; rank 1 keeps 2 of its 6 images in iteration 1 (one of its
    minibatches is empty) and none in iteration 2, rank 0 keeps all of its own."""
    overrides = [*tiny_overrides(tiny_base, iterations=2), "sampling.group_size=2",
                 "sampling.num_groups=6", "train.minibatches_per_pass=3",
                 "train.micro_batch_size=2", "checkpoint.every=2", "eval.at_start=false",
                 "rewards.items=[{name: test_nan_prompts}]", "rewards.nonfinite=drop"]
    overrides, env = _nan_setup(overrides, [[3, 4], [3, 4, 5]])  # ranks: groups 0-2 | 3-5
    _run(TORCHRUN, tmp_path / "two", overrides, timeout=180, **env)
    rows = _rows(tmp_path / "two" / "metrics.jsonl")
    assert [r["reward_num_nonfinite"] for r in rows] == [4, 6]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)



def _checkpoint(run: Path, step: int) -> tuple[dict, dict]:
    from flowdppo.trainer.checkpoint import load_checkpoint

    state = load_checkpoint(run / "checkpoints" / f"step_{step:06d}")
    return state.trainable, state.optimizer["optimizer"]


@pytest.mark.slow
@pytest.mark.parametrize("kind, extra", [
    ("fsdp", []), ("deepspeed_zero2", []),
    # The passes after the rollout: grad-mode old-mean replay and batched reference means.
    ("fsdp", ["train.old_means=replay", "algorithm.hparams.beta=0.01"]),
    ("deepspeed_zero2", ["train.old_means=replay", "algorithm.hparams.beta=0.01"])])
def test_sharded_training_checkpoints_full_state_and_resumes(kind, extra, tiny_base, tmp_path):
    """FSDP (forced onto the CPU, see launch_flowdppo.py) and DeepSpeed ZeRO-2 (its CPU
    accelerator), 2 gloo processes: killed after iteration 1 and resumed, the run logs what
    one process logs, and its checkpoints hold full parameters and an optimizer state equal
    to one process's (Adam's normalisation turns summation-order differences of tiny
    gradients into 1e-5 to 1e-4 parameter differences). Evaluation runs every iteration."""
    import torch

    from test_accelerate_configs import launch_env

    if kind.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    _, env = launch_env(kind)
    if kind == "fsdp":
        env["FLOWDPPO_TEST_FORCE_FSDP"] = "1"
    overrides = [*tiny_overrides(tiny_base, iterations=2), "sampling.group_size=4",
                 "sampling.num_groups=3", "train.minibatches_per_pass=1",
                 "train.micro_batch_size=4", "eval.at_start=false", *extra]
    _run([sys.executable], tmp_path / "one", overrides)
    cut = tmp_path / "two"
    with pytest.raises(AssertionError):  # the test hook's hard exit (137) after iteration 1
        _run(TORCHRUN, cut, overrides, timeout=180, FLOWDPPO_TEST_EXIT_AFTER_ITERATION="1", **env)
    assert (cut / "checkpoints" / "latest").read_text() == "step_000001"
    proc = subprocess.run([*TORCHRUN, LAUNCH, "train", "--resume", str(cut)], env={
        **os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _rows(tmp_path / "one" / "metrics.jsonl"), _rows(cut / "metrics.jsonl")
    assert len(one) == len(two) == 2
    # Evaluation (every iteration; under FSDP on every process) is the one process's too.
    evals_one, evals_two = _rows(tmp_path / "one" / "eval.jsonl"), _rows(cut / "eval.jsonl")
    assert [r["step"] for r in evals_one] == [r["step"] for r in evals_two] == [1, 2]
    for row_one, row_two in zip(evals_one, evals_two):
        for key, value in row_one.items():
            if key.startswith("time_"):
                continue
            if isinstance(value, float):
                assert math.isclose(value, row_two[key], rel_tol=1e-3, abs_tol=1e-5), key
            else:
                assert value == row_two[key], key
    for row_one, row_two in zip(one, two):
        assert (row_one["num_processes"], row_two["num_processes"]) == (1, 2)
        bad = {k: (v, row_two.get(k)) for k, v in row_one.items()
               if not k.startswith("time_") and k != "num_processes" and not _close(v, row_two.get(k))}
        assert not bad, f"step {row_one['step']}: {bad}"
    params_one, optim_one = _checkpoint(tmp_path / "one", 2)
    params_two, optim_two = _checkpoint(cut, 2)
    assert params_one.keys() == params_two.keys()
    for name, value in params_one.items():
        # lr 0.05: one Adam step moves a weight by up to 0.05; 5e-4 is 1 % of that.
        torch.testing.assert_close(params_two[name], value, rtol=1e-3, atol=5e-4)
    assert optim_two["param_groups"][0]["lr"] == optim_one["param_groups"][0]["lr"]
    for i, state in optim_one["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(optim_two["state"][i][key].float(), value.float(),
                                       rtol=1e-3, atol=1e-9)
    assert (cut / "checkpoints" / "step_000002" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_minibatch_plan_gives_every_process_the_same_schedule():
    import torch

    from flowdppo.trainer.distributed import missing_metrics, plan_minibatches, split_sizes

    for n in range(9):
        for parts in range(1, 5):
            assert split_sizes(n, parts) == [len(c) for c in torch.arange(n).tensor_split(parts)]
    # 6 and 2 kept samples, 2 steps each, micro-batches of 4 entries: 3 vs 1 micro-batches.
    (shape,) = plan_minibatches([6, 2], 1, num_steps=2, micro_batch_size=4)
    assert (shape.num_micro_batches, shape.global_entries) == (3, 16)
    # One kept sample each, three minibatches: the last two are empty everywhere (skipped).
    shapes = plan_minibatches([1, 1], 3, num_steps=2, micro_batch_size=4)
    assert [s.num_micro_batches for s in shapes] == [1, 0, 0]
    # A process with nothing still runs the other's micro-batches (padding).
    assert [s.num_micro_batches for s in plan_minibatches([0, 5], 2, 1, 2)] == [2, 1]
    blank = missing_metrics({"loss": torch.tensor(1.0), "ratio_min": torch.tensor(0.5),
                             "ratio_max": torch.tensor(2.0)})
    assert blank["loss"].isnan() and blank["ratio_min"] == float("inf")
    assert blank["ratio_max"] == float("-inf")
