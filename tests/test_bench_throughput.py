"""bench/throughput.py: the CPU tiny mode runs, its report is complete and self-consistent,
and it measures the trainer's own update code (``Updater``), not a copy of it.

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

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPT = BENCH / "throughput.py"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # One thread: the CPU is shared, and two contending threads make the tiny model crawl.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bench():
    # The CLI imports its sibling modules (bench_models, bench_measure) as a script would.
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for name in (spec.name, "bench_models", "bench_measure"):
            sys.modules.pop(name, None)
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def report(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "report.json"
    # A shorter recipe than the default (K=4, R=2, U=2, S=2) keeps the run to a few seconds.
    argv = ["--model", "tiny", "--device", "cpu", "--repeats", "1", "--threads", "1",
            "--num-steps", "4", "--replays", "2", "--trained-steps", "2", "--checkpointing",
            "--json", str(out)]
    assert bench.main(argv) == 0
    return json.loads(out.read_text())


def _stages(bench, *argv: str):
    args = bench.parse_args(["--model", "tiny", "--device", "cpu", "--batch", "2", *argv])
    stages, _, _ = bench.build(args)
    return stages


def test_floor_is_the_hand_sum(bench):
    # Issue 6: eager 10*9.5 + 3*9.5 + 6*25.8 = 278.3; compiled 10*5.3 + 3*5.3 + 6*14.4 = 155.3.
    recipe = bench.Recipe()
    assert bench.floor_ms(9.5, 25.8, recipe) == pytest.approx(10 * 9.5 + 3 * 9.5 + 6 * 25.8)
    assert bench.floor_ms(9.5, 25.8, recipe) == pytest.approx(278.3)
    assert bench.floor_ms(5.3, 14.4, recipe) == pytest.approx(155.3)
    other = bench.Recipe(num_steps=4, num_replays=0, num_updates=3, trained_steps=2)
    assert bench.floor_ms(1.5, 2.0, other) == pytest.approx(4 * 1.5 + 3 * 2 * 2.0)
    # The trainer's own replay count replaces R.
    assert bench.floor_ms(1.5, 2.0, recipe, 1.5) == pytest.approx((10 + 1.5) * 1.5 + 6 * 2.0)


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
    # The trained steps the rollout records: S of them, inside the first half of K.
    steps = report["trained_step_indices"]
    assert len(steps) == r["trained_steps"] and all(0 <= s < r["num_steps"] // 2 for s in steps)
    for row in report["rows"]:
        for key in ("forward_ms", "rollout_ms", "update_ms", "iteration_ms", "floor_ms",
                    "trainer_ms", "tflops_forward", "tflops_update", "tflops_iteration",
                    "tflops_trainer", "first_call_s"):
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
        # The trainer replays the old means of the first pass's later minibatches (S (M-1)/M
        # batch forwards) when its resolved run says so, else none (eager CPU: not): its
        # floor counts those instead of R, and it is compared with the issue's floor of the
        # full recipe (R replays included).
        m = report["minibatches_per_pass"]
        replays = r["trained_steps"] * (m - 1) / m if row["trainer_replays_old_means"] else 0
        assert not row["trainer_replays_old_means"]
        assert row["trainer_replay_forwards"] == pytest.approx(replays)
        trainer_floor = (r["num_steps"] + replays) * row["forward_ms"] + updates * row["update_ms"]
        assert row["trainer_floor_ms"] == pytest.approx(trainer_floor, rel=1e-12)
        assert row["ratio_trainer_to_floor"] == pytest.approx(row["trainer_ms"] / trainer_floor)
        assert row["ratio_trainer_to_issue_floor"] == pytest.approx(row["trainer_ms"] / issue)


def test_trainer_stage_replays_old_means_like_the_trainer(bench, monkeypatch):
    """With replay on and two minibatches, the trainer stage refreshes the second
    minibatch's stored old means from the update's own forward before the first step, and
    the first step's forward defines its own: afterwards every stored old mean is exactly
    what the update's forward gave before the weights moved. That forward mixes steps and
    batch sizes in its micro-batches, so on the CPU it rounds unlike the rollout's (1 ulp)."""
    from flowdppo.trainer import batches, update

    stages = _stages(bench, "--minibatches", "2", "--old-means", "replay")
    assert stages.resolved.replay_old_means and stages.updater.settings.replay_old_means
    recorded = stages.rollout()
    stages.rollout = lambda: recorded
    calls = []  # (optimizer steps taken so far, entries, record_old)
    original = batches.likelihood_batch

    before_steps = []  # (entries, mean) of every forward before the first optimizer step

    def counting(*args, record_old=False, **kwargs):
        calls.append((stages.updater.num_steps_taken, len(args[5]), record_old))
        batch = original(*args, record_old=record_old, **kwargs)
        if stages.updater.num_steps_taken == taken:
            before_steps.append((args[5], batch.mean.detach().clone()))
        return batch

    monkeypatch.setattr(batches, "likelihood_batch", counting)
    steps = []
    monkeypatch.setattr(update, "STEP_HOOKS", [lambda u: steps.append(u.num_steps_taken)])
    before = recorded.mean_old.clone()
    taken = stages.updater.num_steps_taken
    stages.trainer()
    r, b = stages.recipe, stages.batch
    replayed = sum(n for k, n, rec in calls if k == taken and not rec)
    first = sum(n for k, n, rec in calls if rec)
    assert replayed == r.trained_steps * b // 2  # the second minibatch, before any step
    assert first == r.trained_steps * b // 2 and all(k == taken for k, _, rec in calls if rec)
    # Then U passes x 2 optimizer steps over every (sample, step) entry.
    assert sum(n for _, n, _ in calls) == replayed + r.num_updates * r.trained_steps * b
    assert len(steps) == r.num_updates * 2
    assert sum(len(e) for e, _ in before_steps) == replayed + first == r.trained_steps * b
    for entries, mean in before_steps:
        stored = recorded.mean_old[entries.sample, entries.step]
        torch.testing.assert_close(stored, mean, rtol=0, atol=0)
    torch.testing.assert_close(recorded.mean_old, before, rtol=0, atol=1e-6)


def test_update_replays_the_rollout_exactly(bench):
    """The timed update is a genuine first update: the replayed mean is the rollout's (r = 1)."""
    stages = _stages(bench)
    batch = stages.source(stages.stored)(stages.entries_at(1))
    torch.testing.assert_close(batch.mean, batch.mean_old, rtol=0, atol=0)
    assert batch.mean.requires_grad


def test_old_means_rule_comes_from_the_resolved_run(bench):
    """``--old-means`` goes through ``resolve``: auto replays on the CPU only when compiled."""
    auto = _stages(bench)
    assert not auto.resolved.replay_old_means and not auto.updater.settings.replay_old_means
    compiled = bench.for_mode(auto.resolved, compiled=True)
    assert compiled.compile and compiled.replay_old_means
    auto.use(compiled)
    assert auto.updater.settings.replay_old_means
    assert not bench.for_mode(_stages(bench, "--old-means", "rollout").resolved, True).replay_old_means


def test_bench_and_trainer_run_the_same_update_code(bench, monkeypatch, tiny_base, tmp_path):
    """One ``Updater.step`` serves the bench's update, iteration and trainer stages and
    ``Trainer.iteration``: a patched step and a ``STEP_HOOKS`` counter see all of them."""
    from flowdppo.config import load_config, resolve
    from flowdppo.trainer import update
    from flowdppo.trainer.commands import RECIPES
    from flowdppo.trainer.loop import Trainer

    seen = []
    step = update.Updater.step

    def patched(self, source, entries, shape, **kwargs):
        seen.append((type(self), type(source)))
        return step(self, source, entries, shape, **kwargs)

    monkeypatch.setattr(update.Updater, "step", patched)
    hooked = []
    monkeypatch.setattr(update, "STEP_HOOKS", [lambda u: hooked.append(u)])
    stages = _stages(bench, "--num-steps", "4", "--trained-steps", "2", "--replays", "1")
    r = stages.recipe
    stages.update()
    stages.iteration()
    stages.trainer()
    bench_steps = 1 + r.num_updates * r.trained_steps + r.num_updates
    assert len(seen) == len(hooked) == bench_steps
    assert all(u is stages.updater for u in hooked)

    overrides = [f"model.pretrained={tiny_base}", "train.num_iterations=1", "device=cpu",
                 "sampling.num_steps=4", "sampling.sde_steps.count=2", "sampling.group_size=3",
                 "sampling.num_groups=2", "sampling.sde_steps.range=[0.0, 0.75]",
                 "eval.at_start=false", "logging.progress_bar=false", "train.num_updates=2",
                 "train.minibatches_per_pass=2"]
    trainer = Trainer(resolve(load_config(str(RECIPES / "toy_dppo.yaml"), overrides)), tmp_path)
    trainer.iteration(0)
    assert len(seen) == len(hooked) == bench_steps + 2 * 2
    assert hooked[-1] is trainer.updater
    assert set(seen) == {(update.Updater, update.BatchSource)}


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
                                        (["--sync-check"], "--sync-check"),
                                        (["--batch", "1"], "sampling.group_size"),
                                        (["--minibatches", "3"], "minibatches_per_pass")])
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
            "--configs", "eager,compiled", "--minibatches", "2", "--json", str(out)]
    assert bench.main(argv) == 0
    eager, compiled = json.loads(out.read_text())["rows"]
    assert not eager["trainer_replays_old_means"] and compiled["trainer_replays_old_means"]
    assert eager["trainer_replay_forwards"] == 0 and compiled["trainer_replay_forwards"] == 1.0
    for row in (eager, compiled):
        assert all(row[k] > 0 for k in ("forward_ms", "update_ms", "iteration_ms", "trainer_ms"))
