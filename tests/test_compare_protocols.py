"""`flowdppo compare` end to end on synthetic runs: every variant subset writes a report, a
failing report keeps the runs and says how to rebuild it, and the tuned protocol.

Training is faked: ``runner._run_one`` is replaced by a writer of ``eval.jsonl`` /
``metrics.jsonl`` whose numbers depend on the run's method, knob factor, learning rate and
seed, so these tests take seconds and check the report's plumbing, not training.
"""

from __future__ import annotations

import json
import math

import pytest

from flowdppo.cli import main
from flowdppo.compare import commands, runner


def _fake_final(method: str, factor: float, lr: float, seed: int) -> tuple[float, float]:
    """Final (reward, KL) of a fake run: a peak in log(factor) per method, a small lr effect."""
    optimum = {"dppo": 0.0, "grpo": -1.0, "guard": 0.5, "nft": 0.0}.get(method, 0.0)
    reward = (0.9 - 0.05 * (math.log10(factor) - optimum) ** 2
              - 0.03 * math.log10(lr / 1e-3) ** 2 + 0.004 * (seed % 3 - 1))
    return reward, 0.2 * math.sqrt(factor) * lr / 1e-3


def fake_run_one(root, spec, threads):
    path = runner.run_dir(root, spec)
    path.mkdir(parents=True, exist_ok=True)
    config = spec.config
    iterations, every = config["train"]["num_iterations"], config["eval"]["every"] or 10**9
    final_reward, final_kl = _fake_final(spec.method, spec.factor, config["optim"]["lr"], spec.seed)
    names = [item["name"] for item in config["rewards"]["items"]]
    eval_rows, metric_rows = [], []
    steps = sorted({*range(0, iterations, every), iterations} - ({0} if not config["eval"].get(
        "at_start", True) else set()))
    for step in steps:
        w = step / iterations
        row = {"step": step, "reward_mean": 0.3 + w * (final_reward - 0.3), "reward_std": 0.1,
               "kl_ref": w * final_kl, "kl_ref_max": w * final_kl, "kl_ref_unit": "nats",
               "judge_acc": 0.9 + 0.05 * w, "digit_fd": 0.2 + w, "time_eval_s": 0.01}
        for i, name in enumerate(names):
            row[f"reward_{name}"] = 0.4 + (0.3 + 0.1 * i) * w
        eval_rows.append(row)
    for step in range(1, iterations + 1):
        metric_rows.append({"step": step, "loss": 0.0, "diag_clip_kl_disagree": 0.05,
                            "diag_corr_logr_negkl": None if step == 1 else 0.1})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metric_rows))
    (path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    (path / "config.json").write_text(json.dumps(config))


@pytest.fixture
def fake_training(monkeypatch):
    """Runs write synthetic logs; the built-in base model is never built."""
    calls: list[str] = []

    def run_one(root, spec, threads):
        calls.append(spec.name)
        fake_run_one(root, spec, threads)

    monkeypatch.setattr(runner, "_run_one", run_one)
    monkeypatch.setattr(commands, "_prepare_base", lambda bench: None)
    return calls


def _compare(tmp_path, *extra: str) -> int:
    return main(["compare", "--benchmark", "digits", "--methods", "dppo,grpo", "--seeds", "11,12",
                 "--no-sweep", "--iterations", "4", "--jobs", "1", "--device", "cpu",
                 "--output-dir", str(tmp_path), *extra])


SINGLE_VARIANTS = ["main", "lr_x3", "updates_2", "updates_4", "updates_8"]


@pytest.mark.parametrize("variant", SINGLE_VARIANTS)
def test_every_single_variant_alone_writes_a_report(fake_training, tmp_path, variant):
    assert _compare(tmp_path, "--variants", variant) == 0
    payload = json.loads((tmp_path / "compare.json").read_text())
    assert set(payload["variants"]) == {variant}
    assert set(payload["variants"][variant]["methods"]) == {"dppo", "grpo"}
    md = (tmp_path / "compare.md").read_text()
    assert f"## {variant}" in md and "| dppo |" in md
    assert (tmp_path / "reward_vs_images.png").is_file()


def test_a_pair_without_main_writes_a_report(fake_training, tmp_path):
    assert _compare(tmp_path, "--variants", "updates_4,updates_8") == 0
    payload = json.loads((tmp_path / "compare.json").read_text())
    assert set(payload["variants"]) == {"updates_4", "updates_8"}
    assert set(payload["multi_epoch"]["dppo"]) == {"4", "8"}  # no main: no 1-update point
    assert "Multi-epoch study" in (tmp_path / "compare.md").read_text()
    assert len(fake_training) == 8


@pytest.mark.parametrize("variant", ["lag_1", "lag_2", "lag_4", "multi_sum", "multi_gdpo"])
def test_every_opt_in_variant_alone_writes_a_report(fake_training, tmp_path, variant):
    assert _compare(tmp_path, "--variants", variant) == 0
    payload = json.loads((tmp_path / "compare.json").read_text())
    assert set(payload["variants"]) == {variant}
    md = (tmp_path / "compare.md").read_text()
    assert f"## {variant}" in md
    if variant.startswith("lag_"):
        assert "Staleness study" in md and set(payload["staleness"]["grpo"]) == {variant[4:]}
    else:
        assert "Multi-reward" in md and (tmp_path / "multi_reward_components.png").is_file()


def test_lag_and_multi_variants_set_their_config_keys(fake_training, tmp_path):
    from flowdppo.compare.benchmarks import get_benchmark
    from flowdppo.compare.runner import variant_overrides

    bench = get_benchmark("digits")
    assert variant_overrides(bench, "lag_2") == {"train": {"policy_lag": 2}}
    gdpo = variant_overrides(bench, "multi_gdpo")
    assert gdpo["advantages"] == {"mode": "gdpo"}
    assert [(i["name"], i["weight"]) for i in gdpo["rewards"]["items"]] == [("digit_label", 0.5),
                                                                              ("digit_ink", 0.5)]
    assert variant_overrides(bench, "multi_sum")["advantages"] == {"mode": "weighted_sum"}
    with pytest.raises(ValueError, match="reward components"):
        variant_overrides(get_benchmark("shapes"), "multi_gdpo")
    with pytest.raises(ValueError, match="unknown variant"):
        variant_overrides(bench, "lag_x")


def test_main_with_lag_and_multi_variants_reports_every_axis(fake_training, tmp_path):
    assert _compare(tmp_path, "--variants", "main,lag_1,lag_4,multi_sum,multi_gdpo,updates_2") == 0
    payload = json.loads((tmp_path / "compare.json").read_text())
    assert set(payload["staleness"]["dppo"]) == {"0", "1", "4"}  # main is lag 0
    assert set(payload["multi_epoch"]["dppo"]) == {"1", "2"}
    stats = payload["variants"]["multi_gdpo"]["methods"]["grpo"]
    assert "reward_digit_label_final" in stats and "reward_digit_ink_final" in stats
    md = (tmp_path / "compare.md").read_text()
    assert "| grpo | gdpo |" in md and "| dppo | weighted_sum |" in md
    for name in ("staleness.png", "multi_epoch.png", "multi_reward_components.png"):
        assert (tmp_path / name).is_file(), name


def test_a_failing_report_keeps_the_runs_and_says_how_to_rebuild(fake_training, tmp_path, monkeypatch,
                                                                  capsys):
    from flowdppo.compare import study_report

    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(study_report, "write_report", broken)
    assert _compare(tmp_path, "--variants", "updates_4") == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "the 4 finished runs stay under" in err
    command = next(line.strip() for line in err.splitlines() if line.strip().startswith("flowdppo compare --"))
    assert "--variants updates_4" in command and f"--output-dir {tmp_path}" in command
    assert len(fake_training) == 4
    # The printed command, run again once the fault is gone, reuses every run.
    monkeypatch.undo()
    monkeypatch.setattr(runner, "_run_one", lambda *a: pytest.fail("a finished run was redone"))
    monkeypatch.setattr(commands, "_prepare_base", lambda bench: None)
    assert main(command.split()[1:]) == 0
    assert (tmp_path / "compare.md").is_file()


def test_rebuild_command_parses_back_to_the_same_arguments():
    from flowdppo.cli import build_parser

    argv = ["compare", "--benchmark", "shapes", "--protocol", "tuned", "--methods", "dppo,grpo",
            "--variants", "updates_4", "--grid-points", "3", "--lrs", "1e-3", "--quick",
            "--set", "eval.monitors=[{name: diversity}]", "--output-dir", "out dir"]
    args = build_parser().parse_args(argv)
    again = build_parser().parse_args(__import__("shlex").split(commands.rebuild_command(args))[1:])
    assert vars(again) == vars(args)


def test_no_planned_run_is_a_clear_error(fake_training, tmp_path, capsys):
    code = main(["compare", "--methods", "nft", "--variants", "updates_4", "--no-sweep",
                 "--output-dir", str(tmp_path)])
    assert code == 2 and "no runs planned" in capsys.readouterr().err


def _tuned(tmp_path, *extra: str) -> int:
    return main(["compare", "--protocol", "tuned", "--benchmark", "digits", "--methods", "dppo,grpo",
                 "--grid-points", "7", "--grid-span", "1000", "--lrs", "3e-4,1e-3,3e-3",
                 "--tuning-seeds", "1000,1001", "--heldout-seeds", "0,1,2", "--iterations", "4",
                 "--jobs", "1", "--device", "cpu", "--output-dir", str(tmp_path), *extra])


def test_tuned_protocol_selects_on_tuning_seeds_then_reports_held_out(fake_training, tmp_path):
    assert _tuned(tmp_path, "--kl-budget", "10") == 0
    tune = [n for n in fake_training if n.startswith("tune_")]
    held = [n for n in fake_training if n.startswith("heldout_")]
    assert len(tune) == 2 * 7 * 3 * 2 and len(held) == 2 * 3
    # Held-out runs start only after every tuning run, and tuning never used a held-out seed.
    assert max(fake_training.index(n) for n in tune) < min(fake_training.index(n) for n in held)
    assert all(n.endswith(("seed1000", "seed1001")) for n in tune)
    assert all(n.endswith(("seed0", "seed1", "seed2")) for n in held)
    payload = json.loads((tmp_path / "compare.json").read_text())
    held_out = payload["settings"]["main"]["heldout"]
    # The fake's optimum: dppo at x1, grpo at x0.1 (one grid step), both at lr 1e-3.
    assert held_out["methods"]["dppo"]["factor"] == pytest.approx(1.0)
    assert held_out["methods"]["grpo"]["factor"] == pytest.approx(10 ** -1.0)
    assert held_out["methods"]["grpo"]["lr"] == pytest.approx(1e-3)
    assert set(held_out["methods"]["grpo"]["per_seed"]) == {"0", "1", "2"}
    diff = held_out["methods"]["grpo"]["final_reward_diff_to_dppo"]
    assert diff["low"] <= diff["diff"] <= diff["high"] and diff["seeds"] == [0, 1, 2]
    ranges = payload["settings"]["main"]["working_range"]
    assert 0 < ranges["dppo"]["share_of_grid"] <= 1 and ranges["dppo"]["factor_span"] >= 1
    assert len(payload["settings"]["main"]["grid"]) == 2 * 7 * 3
    md = (tmp_path / "compare.md").read_text()
    assert "Selection rule: On the tuning seeds only" in md and "Δ reward vs dppo [95% CI]" in md
    for name in ("frontier_main.png", "knob_vs_reward_main.png", "heldout_reward_main.png"):
        assert (tmp_path / name).is_file(), name
    # Repeated, every run is reused.
    fake_training.clear()
    assert _tuned(tmp_path, "--kl-budget", "10") == 0
    assert fake_training == []


def test_tuned_kl_budget_changes_the_choice_and_names_a_new_held_out_run(fake_training, tmp_path):
    assert _tuned(tmp_path, "--grid-points", "2", "--grid-span", "100", "--lrs", "1e-3",
                  "--kl-budget", "10") == 0
    first = json.loads((tmp_path / "compare.json").read_text())["settings"]["main"]["heldout"]
    assert first["methods"]["dppo"]["factor"] == pytest.approx(0.1)  # equal reward: lower KL wins
    fake_training.clear()
    # A budget only x0.1 meets: same choice, nothing reruns; the grid is reused too.
    assert _tuned(tmp_path, "--grid-points", "2", "--grid-span", "100", "--lrs", "1e-3",
                  "--kl-budget", "0.1") == 0
    assert fake_training == []
    payload = json.loads((tmp_path / "compare.json").read_text())
    assert payload["settings"]["main"]["within_budget"] == {"dppo": True, "grpo": True}


def test_tuned_refuses_overlapping_seeds_and_lr_x3(fake_training, tmp_path, capsys):
    assert _tuned(tmp_path, "--heldout-seeds", "1000,5") == 2
    assert "share [1000]" in capsys.readouterr().err
    assert _tuned(tmp_path, "--variants", "lr_x3") == 2
    assert "grids the learning rate" in capsys.readouterr().err
    assert fake_training == []


def test_tuning_runs_evaluate_once_and_transfers_run_at_the_chosen_points(fake_training, tmp_path):
    assert _tuned(tmp_path, "--grid-points", "3", "--grid-span", "100", "--lrs", "1e-3",
                  "--kl-budget", "10", "--transfer", "lag_2,multi_gdpo") == 0
    tune_dir = tmp_path / "runs" / "tune_main_x0.1_lr0.001" / "dppo" / "seed1000"
    rows = [json.loads(line) for line in (tune_dir / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4]  # no base or intermediate evaluation
    payload = json.loads((tmp_path / "compare.json").read_text())
    chosen = payload["settings"]["main"]["heldout"]["methods"]
    for variant in ("lag_2", "multi_gdpo"):
        moved = payload["settings"][f"{variant}@main"]
        assert moved["transferred_from"] == "main"
        for method in ("dppo", "grpo"):
            row = moved["heldout"]["methods"][method]
            assert (row["factor"], row["lr"]) == (chosen[method]["factor"], chosen[method]["lr"])
            assert set(row["per_seed"]) == {"0", "1", "2"}
    runs = {n for n in fake_training if n.startswith("heldout_lag_2")}
    assert len(runs) == 2 * 3
    for name in runs:
        config = json.loads((tmp_path / "runs" / name / "config.json").read_text())
        assert config["train"]["policy_lag"] == 2 and config["eval"].get("at_start", True)
    md = (tmp_path / "compare.md").read_text()
    assert "## multi_gdpo at the points chosen for main" in md and "min component" in md
    change = payload["settings"]["lag_2@main"]["heldout"]["methods"]["grpo"]["change_from_source"]
    assert change["final_reward"]["diff"] == pytest.approx(0.0)  # the fake ignores the lag
    assert "Change from main to lag_2" in md
    # A multi-reward variant trains on another reward: its change in reward is not reported.
    multi = payload["settings"]["multi_gdpo@main"]["heldout"]["methods"]["dppo"]["change_from_source"]
    assert set(multi) == {"final_kl_ref"} and "– (another reward)" in md
    claims = {c["name"]: c for c in payload["claims"]}
    assert set(claims) == {"higher reward at lower KL", "less forgetting", "balanced multi-objective",
                           "robust to staleness"}
    assert claims["robust to staleness"]["setting"] == "lag_2@main"
    assert "## The paper's claims on these held-out runs" in md
    assert (tmp_path / "heldout_reward_lag_2_at_main.png").is_file()
    assert (tmp_path / "components_multi_gdpo_at_main.png").is_file()
    assert not (tmp_path / "components_lag_2_at_main.png").exists()


def test_transfer_rejects_unknown_and_lr_variants(fake_training, tmp_path, capsys):
    assert _tuned(tmp_path, "--transfer", "lag_x") == 2
    assert "unknown variant" in capsys.readouterr().err
    assert _tuned(tmp_path, "--transfer", "lr_x3") == 2
    assert fake_training == []


def test_transfer_methods_follow_each_study():
    from flowdppo.compare.tuned import transfer_methods

    methods = ["dppo", "grpo", "guard", "nft"]
    assert transfer_methods("updates_4", methods) == ["dppo", "grpo"]
    assert transfer_methods("multi_gdpo", methods) == ["dppo", "grpo"]
    assert transfer_methods("lag_2", methods) == methods


def test_tuning_from_an_earlier_report_reruns_no_grid_and_keeps_the_choice(fake_training, tmp_path):
    first = tmp_path / "first"
    assert _tuned(first, "--grid-points", "3", "--grid-span", "100", "--kl-budget", "10") == 0
    recorded = json.loads((first / "compare.json").read_text())
    assert recorded["iterations"] == 4 and recorded["tuning_from"] is None
    fake_training.clear()
    second = tmp_path / "second"
    assert _tuned(second, "--grid-points", "3", "--grid-span", "100", "--kl-budget", "10",
                  "--tuning-from", str(first / "compare.json"), "--transfer", "lag_2") == 0
    assert fake_training and not [n for n in fake_training if n.startswith("tune_")]
    again = json.loads((second / "compare.json").read_text())
    assert again["settings"]["main"]["grid"] == recorded["settings"]["main"]["grid"]
    for method in ("dppo", "grpo"):
        before = recorded["settings"]["main"]["heldout"]["methods"][method]
        after = again["settings"]["main"]["heldout"]["methods"][method]
        assert (after["factor"], after["lr"], after["per_seed"]) == (before["factor"], before["lr"],
                                                                     before["per_seed"])
    assert again["tuning_from"] == str(first / "compare.json")
    assert "not rerun here" in (second / "compare.md").read_text()
    # The rule is applied afresh: a budget only the smallest factor meets moves the choice.
    third = tmp_path / "third"
    assert _tuned(third, "--grid-points", "3", "--grid-span", "100", "--kl-budget", "0.03",
                  "--tuning-from", str(first / "compare.json")) == 0
    moved = json.loads((third / "compare.json").read_text())["settings"]["main"]["heldout"]["methods"]
    assert moved["dppo"]["factor"] == pytest.approx(0.1)


@pytest.mark.parametrize("flags, field", [(("--iterations", "5"), "iterations"),
                                          (("--lrs", "1e-3"), "lrs"),
                                          (("--tuning-seeds", "1000"), "tuning_seeds"),
                                          (("--methods", "dppo,guard"), "'guard'")])
def test_tuning_from_a_report_of_another_plan_is_refused_before_any_run(fake_training, tmp_path, capsys,
                                                                         flags, field):
    first = tmp_path / "first"
    assert _tuned(first, "--grid-points", "3", "--grid-span", "100") == 0
    fake_training.clear()
    assert _tuned(tmp_path / "second", "--grid-points", "3", "--grid-span", "100", *flags,
                  "--tuning-from", str(first / "compare.json")) == 2
    err = capsys.readouterr().err
    assert "--tuning-from" in err and field in err
    assert fake_training == []


def test_tuning_from_refuses_a_file_that_is_not_a_tuned_report(fake_training, tmp_path, capsys):
    bad = tmp_path / "compare.json"
    bad.write_text(json.dumps({"protocol": "standard"}))
    assert _tuned(tmp_path / "out", "--tuning-from", str(bad)) == 2
    assert "not a tuned report" in capsys.readouterr().err
    assert _compare(tmp_path / "std", "--tuning-from", str(bad)) == 2
    assert "needs --protocol tuned" in capsys.readouterr().err
    assert fake_training == []
