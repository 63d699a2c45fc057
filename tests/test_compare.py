"""`flowdppo compare`: the report's arithmetic on hand-made curves, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math

import pytest

from fast_runs import tiny_overrides
from flowdppo.cli import main
from flowdppo.compare.methods import D_PAPER, METHODS
from flowdppo.compare.report import (
    RunCurves,
    aggregate,
    matched_kl_level,
    reward_at_kl,
    run_summary,
)


def _curve(method, kls, rewards, judge=None, seed=0):
    rows = [{"step": 10 * i, "reward_mean": r, "kl_ref": k, **({"judge_acc": judge[i]} if judge else {})}
            for i, (k, r) in enumerate(zip(kls, rewards))]
    return RunCurves(method, seed, rows, [])


def test_reward_at_kl_interpolates_along_the_run():
    curve = _curve("a", [0.0, 0.1, 0.3], [0.2, 0.6, 0.9])
    assert reward_at_kl(curve, 0.2) == pytest.approx(0.75)
    assert reward_at_kl(curve, 0.1) == pytest.approx(0.6)
    assert reward_at_kl(curve, 1.0) == pytest.approx(0.9)  # never reached: its best


def test_summary_quantities_by_hand():
    curve = _curve("a", [0.0, 0.1, 0.4], [0.2, 0.8, 0.5], judge=[0.9, 0.95, 0.7])
    s = run_summary(curve, kl_level=0.1, lower_is_better=("fd",))
    assert s["final_reward"] == 0.5 and s["best_reward"] == 0.8
    assert s["peak_to_final_drop"] == pytest.approx(0.3)
    assert s["reward_gain_per_kl"] == pytest.approx((0.5 - 0.2) / 0.4)
    assert s["judge_acc_final"] == 0.7 and s["judge_acc_drop_from_peak"] == pytest.approx(0.25)


def test_matched_level_is_the_smallest_median_final_kl_and_aggregate_has_std():
    by_method = {"a": [_curve("a", [0, 0.2], [0.1, 0.5], seed=s) for s in range(3)],
                 "b": [_curve("b", [0, 0.4], [0.1, 0.7]), _curve("b", [0, 0.6], [0.1, 0.9], seed=1)]}
    assert matched_kl_level(by_method) == pytest.approx(0.2)
    result = aggregate(by_method, ("fd",))
    assert result["methods"]["b"]["final_reward"]["mean"] == pytest.approx(0.8)
    assert result["methods"]["b"]["final_reward"]["std"] == pytest.approx(0.1)
    assert result["methods"]["a"]["final_reward"]["n"] == 3


def test_method_settings_follow_one_scaling_rule():
    for name, preset in METHODS.items():
        small, large = preset.knob_value(64), preset.knob_value(768)
        expected = D_PAPER / 64 / (D_PAPER / 768) if preset.per_element else 1.0
        assert small / large == pytest.approx(expected), name
    assert METHODS["dppo"].knob_value(D_PAPER) == pytest.approx(1e-7)
    assert METHODS["grpo"].knob_value(64) == pytest.approx(1e-4 * D_PAPER / 64)


def test_tiny_compare_writes_every_output(tiny_base, tmp_path):
    sets = []
    for item in tiny_overrides(tiny_base, iterations=2):
        if not item.startswith(("train.num_iterations", "logging", "device")):
            sets += ["--set", item]
    code = main(["compare", "--benchmark", "digits", "--quick", "--methods", "dppo,grpo",
                 "--variants", "main,updates_2", "--iterations", "2", "--jobs", "2",
                 "--output-dir", str(tmp_path), "--device", "cpu", *sets,
                 "--set", "eval.monitors=[{name: digit_judge}, {name: diversity}]"])
    assert code == 0
    for name in ("compare.md", "compare.json", "reward_vs_images.png", "kl_vs_images.png",
                 "reward_vs_kl.png", "monitors_vs_images.png", "multi_epoch.png",
                 "noise_diagnostic.png"):
        assert (tmp_path / name).is_file(), name
    payload = json.loads((tmp_path / "compare.json").read_text())
    assert set(payload["variants"]["main"]["methods"]) == {"dppo", "grpo"}
    assert set(payload["multi_epoch"]["dppo"]) == {"1", "2"}
    final = payload["variants"]["main"]["methods"]["dppo"]["final_kl_ref"]["mean"]
    assert math.isfinite(final) and final > 0
    md = (tmp_path / "compare.md").read_text()
    assert "| dppo |" in md and "Multi-epoch study" in md and "Noise diagnostic" in md
    # A repeated command finds every run complete and redoes none.
    metrics = tmp_path / "runs" / "main" / "dppo" / "seed0" / "metrics.jsonl"
    stamp = metrics.stat().st_mtime_ns
    assert main(["compare", "--benchmark", "digits", "--quick", "--methods", "dppo,grpo",
                 "--variants", "main,updates_2", "--iterations", "2", "--output-dir", str(tmp_path),
                 "--device", "cpu", *sets,
                 "--set", "eval.monitors=[{name: digit_judge}, {name: diversity}]"]) == 0
    assert metrics.stat().st_mtime_ns == stamp
