"""Aggregating runs into ``compare.json`` and ``compare.md``: per method, mean ± std over
seeds of the quantities that separate methods (not final reward alone)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..trainer.evaluation import KL_UNIT

_SKIP_EVAL_KEYS = {"step", "reward_std", "kl_ref_max", "kl_ref_unit", "time_eval_s"}


@dataclass(frozen=True)
class RunCurves:
    """One run's evaluation curve and its training diagnostics."""

    method: str
    seed: int
    eval_rows: list[dict[str, Any]]
    metric_rows: list[dict[str, Any]]

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        rows = [r for r in self.eval_rows if isinstance(r.get(key), (int, float))]
        return np.array([r["step"] for r in rows]), np.array([float(r[key]) for r in rows])


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run(path: Path, method: str, seed: int) -> RunCurves:
    return RunCurves(method, seed, read_jsonl(path / "eval.jsonl"), read_jsonl(path / "metrics.jsonl"))


def reward_at_kl(curve: RunCurves, kl_level: float) -> float:
    """In-domain reward where the run's eval KL first reaches ``kl_level`` (linear interpolation
    along the run); the run's best reward if it never gets that far."""
    _, kl = curve.series("kl_ref")
    _, reward = curve.series("reward_mean")
    if len(kl) == 0:
        return math.nan
    for i in range(1, len(kl)):
        if kl[i] >= kl_level > kl[i - 1] or kl[i] == kl_level:
            w = (kl_level - kl[i - 1]) / max(kl[i] - kl[i - 1], 1e-30)
            return float(reward[i - 1] + w * (reward[i] - reward[i - 1]))
    return float(reward.max())


def run_summary(curve: RunCurves, kl_level: float, lower_is_better: Sequence[str]) -> dict[str, float]:
    """The table's per-run quantities."""
    _, reward = curve.series("reward_mean")
    _, kl = curve.series("kl_ref")
    out = {
        "final_reward": float(reward[-1]),
        "best_reward": float(reward.max()),
        "base_reward": float(reward[0]),
        "peak_to_final_drop": float(reward.max() - reward[-1]),
        "final_kl_ref": float(kl[-1]),
        "reward_at_matched_kl": reward_at_kl(curve, kl_level),
        "reward_gain_per_kl": float((reward[-1] - reward[0]) / max(kl[-1], 1e-12)),
    }
    last = curve.eval_rows[-1]
    for key, value in last.items():
        if key in _SKIP_EVAL_KEYS or key in ("reward_mean", "kl_ref") or not isinstance(value, (int, float)):
            continue
        _, values = curve.series(key)
        lower = any(token in key for token in lower_is_better)
        peak = values.min() if lower else values.max()
        out[f"{key}_final"] = float(values[-1])
        out[f"{key}_drop_from_peak"] = float(values[-1] - peak if lower else peak - values[-1])
    diag = [r for r in curve.metric_rows if "diag_clip_kl_disagree" in r]
    if diag:
        out["diag_clip_kl_disagree"] = float(np.mean([r["diag_clip_kl_disagree"] for r in diag]))
        corr = [r["diag_corr_logr_negkl"] for r in diag
                if isinstance(r["diag_corr_logr_negkl"], (int, float)) and math.isfinite(r["diag_corr_logr_negkl"])]
        out["diag_corr_logr_negkl"] = float(np.mean(corr)) if corr else math.nan
    return out


def matched_kl_level(curves_by_method: dict[str, list[RunCurves]]) -> float:
    """The smallest per-method median final KL: a level every method's runs (mostly) reach."""
    medians = []
    for curves in curves_by_method.values():
        finals = [c.series("kl_ref")[1][-1] for c in curves if c.eval_rows]
        if finals:
            medians.append(float(np.median(finals)))
    return min(medians) if medians else math.nan


def aggregate(curves_by_method: dict[str, list[RunCurves]], lower_is_better: Sequence[str]) -> dict[str, Any]:
    level = matched_kl_level(curves_by_method)
    table: dict[str, dict[str, dict[str, float]]] = {}
    for method, curves in curves_by_method.items():
        summaries = [run_summary(c, level, lower_is_better) for c in curves if len(c.eval_rows) >= 2]
        if not summaries:
            continue
        keys = sorted(set().union(*summaries))
        table[method] = {
            k: {"mean": float(np.nanmean([s.get(k, math.nan) for s in summaries])),
                "std": float(np.nanstd([s.get(k, math.nan) for s in summaries])),
                "n": len(summaries)}
            for k in keys
        }
    return {"matched_kl": level, "kl_unit": KL_UNIT, "methods": table}


MAIN_COLUMNS = (
    ("final_reward", "final reward"), ("best_reward", "best reward"),
    ("reward_at_matched_kl", "reward @ matched KL"), ("peak_to_final_drop", "peak→final drop"),
    ("final_kl_ref", "final KL to ref"), ("reward_gain_per_kl", "Δreward / KL"),
)


def _cell(stats: dict[str, dict[str, float]], key: str) -> str:
    if key not in stats or math.isnan(stats[key]["mean"]):
        return "–"
    s = stats[key]
    fmt = ".2e" if abs(s["mean"]) < 1e-2 and s["mean"] != 0 else ".3f"
    return f"{s['mean']:{fmt}} ± {s['std']:{fmt}}"


def markdown_table(result: dict[str, Any], extra_keys: Sequence[str] = ()) -> str:
    methods = result["methods"]
    columns = list(MAIN_COLUMNS) + [(k, k.replace("_", " ")) for k in extra_keys]
    lines = ["| method | n | " + " | ".join(title for _, title in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for method, stats in methods.items():
        n = next(iter(stats.values()))["n"]
        lines.append(f"| {method} | {n} | " + " | ".join(_cell(stats, k) for k, _ in columns) + " |")
    return "\n".join(lines)


def monitor_keys(result: dict[str, Any]) -> list[str]:
    keys: set[str] = set()
    for stats in result["methods"].values():
        keys |= {k for k in stats if k.endswith("_final") or k.endswith("_drop_from_peak")}
    return sorted(keys)
