"""bench/throughput.py: the CPU tiny mode runs and its report is complete and self-consistent.

Nothing here is timed: the checks are the report's fields, signs and arithmetic.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "throughput.py"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # One thread: the CPU is shared, and two contending threads make the tiny model crawl.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def report(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "report.json"
    # A shorter recipe than the default (K=4, R=2, U=2, S=2) keeps the run to a few seconds.
    argv = ["--model", "tiny", "--device", "cpu", "--repeats", "1", "--threads", "1",
            "--num-steps", "4", "--replays", "2", "--trained-steps", "2", "--checkpointing",
            "--json", str(out)]
    assert bench.main(argv) == 0
    return json.loads(out.read_text())


def test_floor_is_the_hand_sum(bench):
    # Issue 6: eager 10*9.5 + 3*9.5 + 6*25.8 = 278.3; compiled 10*5.3 + 3*5.3 + 6*14.4 = 155.3.
    recipe = bench.Recipe()
    assert bench.floor_ms(9.5, 25.8, recipe) == pytest.approx(10 * 9.5 + 3 * 9.5 + 6 * 25.8)
    assert bench.floor_ms(9.5, 25.8, recipe) == pytest.approx(278.3)
    assert bench.floor_ms(5.3, 14.4, recipe) == pytest.approx(155.3)
    other = bench.Recipe(num_steps=4, num_replays=0, num_updates=3, trained_steps=2)
    assert bench.floor_ms(1.5, 2.0, other) == pytest.approx(4 * 1.5 + 3 * 2 * 2.0)


def test_report_fields_positive_and_consistent(report):
    assert report["model"] == "tiny" and report["device"] == "cpu"
    assert report["latent_shape"] == [4, 8, 8]  # 64 px / VAE factor 8, 4 channels
    assert report["num_params"] > 0
    r = report["recipe"]
    flops = report["flops_per_sample"]
    # A backward pass adds work on top of its forward.
    assert 0 < flops["forward"] < flops["update"]
    assert [(row["mode"], row["checkpointing"]) for row in report["rows"]] == [
        ("eager", False), ("eager", True)]
    for row in report["rows"]:
        for key in ("forward_ms", "rollout_ms", "update_ms", "iteration_ms", "floor_ms",
                    "tflops_forward", "tflops_update", "tflops_iteration", "first_call_s"):
            assert math.isfinite(row[key]) and row[key] > 0, key
        assert all(row[f"peak_gib_{k}"] is None for k in ("forward", "update", "iteration"))
        forwards = r["num_steps"] + r["num_replays"]
        updates = r["num_updates"] * r["trained_steps"]
        hand = forwards * row["forward_ms"] + updates * row["update_ms"]
        assert row["floor_ms"] == pytest.approx(hand, rel=1e-12)
        assert row["ratio_to_floor"] == pytest.approx(row["iteration_ms"] / hand, rel=1e-12)
        # The issue's eager primitives (9.5, 25.8 ms/sample) through this run's recipe.
        issue = forwards * 9.5 + updates * 25.8
        assert row["issue_floor_ms"] == pytest.approx(issue)
        assert row["ratio_to_issue_floor"] == pytest.approx(row["iteration_ms"] / issue)
        work = forwards * flops["forward"] + updates * flops["update"]
        assert row["tflops_iteration"] == pytest.approx(work / row["iteration_ms"] * 1e-9)
        # The trainer's iteration replays no steps (eager CPU: old means as recorded) or S
        # steps: its floor counts those instead of R, and it is compared with the issue's
        # floor of the full recipe (R replays included).
        replays = r["trained_steps"] if row["trainer_replays_old_means"] else 0
        trainer_floor = (r["num_steps"] + replays) * row["forward_ms"] + updates * row["update_ms"]
        assert row["trainer_floor_ms"] == pytest.approx(trainer_floor, rel=1e-12)
        assert row["ratio_trainer_to_floor"] == pytest.approx(row["trainer_ms"] / trainer_floor)
        assert row["ratio_trainer_to_issue_floor"] == pytest.approx(row["trainer_ms"] / issue)


def test_trainer_stage_replays_old_means_like_the_trainer(bench):
    """With replay on, the trainer stage refreshes the stored old means from the update's own
    forward; on CPU in fp32 that forward equals the rollout's, so they come back unchanged."""
    args = bench.parse_args(["--model", "tiny", "--device", "cpu", "--batch", "2"])
    stages, _, _ = bench.build(args)
    recorded = stages.rollout()
    refreshed = []
    stages.rollout = lambda: recorded
    original = stages._batch
    stages._batch = lambda rollout, entries: refreshed.append(entries) or original(rollout, entries)
    stages.replay_old_means = True
    before = recorded.mean_old.clone()
    stages.trainer()
    r = stages.recipe
    # S replays, then U x S update batches.
    assert len(refreshed) == r.trained_steps * (1 + r.num_updates)
    torch.testing.assert_close(recorded.mean_old, before, rtol=0, atol=0)


def test_update_replays_the_rollout_exactly(bench):
    """The timed update is a genuine first update: the replayed mean is the rollout's (r = 1)."""
    args = bench.parse_args(["--model", "tiny", "--device", "cpu", "--batch", "2"])
    stages, _, _ = bench.build(args)
    batch = stages._batch(stages.stored, stages._entries(1))
    torch.testing.assert_close(batch.mean, batch.mean_old, rtol=0, atol=0)
    assert batch.mean.requires_grad


def test_no_flops_and_a_pinned_attention_backend(bench, tmp_path):
    out = tmp_path / "r.json"
    argv = ["--model", "tiny", "--device", "cpu", "--repeats", "1", "--num-steps", "2",
            "--replays", "0", "--trained-steps", "1", "--no-flops", "--attention", "math",
            "--json", str(out)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert report["flops_per_sample"] is None and math.isnan(row["tflops_update"])
    assert row["update_ms"] > 0


def test_config_selection(bench):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    choose = lambda argv, device: bench.chosen_configs(bench.parse_args(argv), device)  # noqa: E731
    assert choose([], cpu) == ["eager"]
    assert choose([], cuda) == ["eager", "compiled"]
    assert choose(["--checkpointing", "--no-compile"], cuda) == ["eager", "eager+ckpt"]
    assert choose(["--configs", "compiled, eager+ckpt"], cpu) == ["compiled", "eager+ckpt"]


@pytest.mark.parametrize("argv, word", [(["--resolution", "60"], "--resolution"),
                                        (["--trained-steps", "6"], "--trained-steps"),
                                        (["--configs", "eager,fast"], "--configs"),
                                        (["--sync-check"], "--sync-check")])
def test_bad_arguments_exit_with_a_message(bench, capsys, argv, word):
    assert bench.main(["--model", "tiny", "--device", "cpu", *argv]) == 2
    assert word in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_mode_runs_and_its_trainer_stage_replays(bench, tmp_path):
    """torch.compile (inductor on the CPU) through every stage; compiled runs replay the old
    means like the trainer's `train.old_means: auto`."""
    out = tmp_path / "compiled.json"
    argv = ["--model", "tiny", "--device", "cpu", "--repeats", "1", "--threads", "1",
            "--num-steps", "4", "--replays", "2", "--trained-steps", "2", "--no-flops",
            "--configs", "eager,compiled", "--json", str(out)]
    assert bench.main(argv) == 0
    eager, compiled = json.loads(out.read_text())["rows"]
    assert not eager["trainer_replays_old_means"] and compiled["trainer_replays_old_means"]
    for row in (eager, compiled):
        assert all(row[k] > 0 for k in ("forward_ms", "update_ms", "iteration_ms", "trainer_ms"))
