"""The standard protocol's report (``compare.md``, ``compare.json``, PNGs) for any subset of
variants: the main table per variant, the monitors and noise diagnostic of the lead variant
(``main`` when it ran, else the first), and the axis studies (updates per rollout,
staleness, multi-reward) from whichever of their variants ran."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import plots
from .report import _cell, aggregate, load_run, markdown_table, monitor_keys
from .runner import MULTI_EPOCH_METHODS, MULTI_MODES, RunSpec, run_dir

_NOT_MONITORS = ("step", "reward_mean", "reward_std", "kl_ref", "kl_ref_max", "time_eval_s")
# (variant prefix, value of `main` on that axis, methods, title, x label)
AXES = {
    "multi_epoch": ("updates_", 1, MULTI_EPOCH_METHODS, "Multi-epoch study (updates per rollout)",
                    "updates per rollout"),
    "staleness": ("lag_", 0, None, "Staleness study (policy lag, iterations)", "policy lag k"),
}


def group_runs(root: Path, specs: Sequence[RunSpec]) -> dict[str, dict[str, list]]:
    """``{variant: {method: [RunCurves per seed]}}`` of the specs' run directories."""
    by_variant: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for spec in specs:
        by_variant[spec.variant][spec.method].append(load_run(run_dir(root, spec), spec.method, spec.seed))
    return by_variant


def _variant_order(variant: str) -> tuple[bool, str, int]:
    match = re.fullmatch(r"(\D+?)(\d+)", variant)
    return (variant != "main", match.group(1) if match else variant, int(match.group(2)) if match else 0)


def write_report(root: Path, bench, specs: Sequence[RunSpec], factors: dict[str, float],
                 wall_s: float) -> list[Path]:
    by_variant = group_runs(root, specs)
    results = {v: aggregate(m, bench.lower_is_better) for v, m in by_variant.items()}
    results = {v: results[v] for v in sorted(results, key=_variant_order) if results[v]["methods"]}
    if not results:
        raise ValueError(f"no finished run with two evaluations under {root / 'runs'} to report")
    lead = next(iter(results))
    studies = {name: axis_study(results, *AXES[name][:3]) for name in AXES}
    studies = {name: study for name, study in studies.items() if study}
    figures = _figures(root, bench, by_variant, results, lead, studies)
    payload = {"benchmark": bench.name, "protocol": "standard", "wall_time_s": wall_s,
               "sweep_factors": factors, "lead_variant": lead, "variants": results,
               **{name: {m: {str(u): v for u, v in s.items()} for m, s in study.items()}
                  for name, study in studies.items()}}
    (root / "compare.json").write_text(json.dumps(payload, indent=2))
    md = _markdown(bench, results, lead, studies, factors, wall_s)
    (root / "compare.md").write_text(md)
    return [root / "compare.md", root / "compare.json", *figures]


def _figures(root: Path, bench, by_variant, results, lead: str, studies) -> list[Path]:
    main = by_variant[lead]
    images_per_step = bench.recipe["sampling"]["num_groups"] * bench.recipe["sampling"]["group_size"]
    monitor_series = sorted({k for curves in main.values() for c in curves if c.eval_rows
                             for k, v in c.eval_rows[-1].items()
                             if isinstance(v, (int, float)) and k not in _NOT_MONITORS})
    figures = [
        plots.curves_vs_images(main, "reward_mean", f"in-domain reward ({lead})",
                               root / "reward_vs_images.png", images_per_step),
        plots.curves_vs_images(main, "kl_ref", f"KL to reference ({lead})", root / "kl_vs_images.png",
                               images_per_step),
        plots.reward_vs_kl(main, root / "reward_vs_kl.png", results[lead]["kl_unit"]),
        plots.monitors_vs_images(main, monitor_series, root / "monitors_vs_images.png", images_per_step),
        plots.noise_diagnostic(main, root / "noise_diagnostic.png"),
    ]
    for name, study in studies.items():
        figures.append(plots.axis_study(study, root / f"{name}.png", AXES[name][4],
                                        log2=AXES[name][1] > 0))
    multi = {f"{m} ({v.removeprefix('multi_')})": curves for v in MULTI_MODES if v in by_variant
             for m, curves in by_variant[v].items()}
    if multi:
        keys = ["reward_mean", *bench.component_keys, "kl_ref"]
        figures.append(plots.monitors_vs_images(multi, keys, root / "multi_reward_components.png",
                                                images_per_step))
    return figures


def axis_study(results: dict[str, Any], prefix: str, main_value: int,
               methods: Sequence[str] | None) -> dict[str, dict[int, dict[str, tuple[float, float]]]]:
    """``study[method][value][quantity] = (mean, std)`` along one axis (``updates_<n>``,
    ``lag_<k>``); ``main`` is the axis' ``main_value``. Empty when no variant of the axis ran."""
    values = {v: int(v.removeprefix(prefix)) for v in results
              if v.startswith(prefix) and v.removeprefix(prefix).isdigit()}
    if not values:
        return {}
    if "main" in results:
        values["main"] = main_value
    study: dict[str, dict[int, dict[str, tuple[float, float]]]] = {}
    for variant, value in values.items():
        for method, stats in results[variant]["methods"].items():
            if methods is not None and method not in methods:
                continue
            study.setdefault(method, {})[value] = {
                k: (stats[k]["mean"], stats[k]["std"])
                for k in ("final_reward", "peak_to_final_drop", "final_kl_ref") if k in stats}
    return study


def _markdown(bench, results, lead, studies, factors, wall_s) -> str:
    lines = [f"# flowdppo compare — {bench.name}", "",
             f"Wall time {wall_s / 60:.1f} min. KL to the reference: {results[lead]['kl_unit']}; "
             f"matched-KL level ({lead}) {results[lead]['matched_kl']:.3g}. Mean ± std over seeds.", ""]
    if factors:
        lines += ["Sweep factors chosen (× the scaled paper setting): "
                  + ", ".join(f"{m}: {f:g}" for m, f in sorted(factors.items())), ""]
    for variant in results:
        lines += [f"## {variant}", "", markdown_table(results[variant]), ""]
    lines += [f"## Out-of-domain monitors and reward components ({lead})", "",
              _monitor_table(results[lead], monitor_keys(results[lead])), ""]
    lines += [f"## Noise diagnostic (likelihood methods, {lead})", "", _diag_table(results[lead]), ""]
    for name, study in studies.items():
        lines += [f"## {AXES[name][3]}", "", _study_table(study, AXES[name][4]), ""]
    multi = [v for v in MULTI_MODES if v in results]
    if multi:
        lines += ["## Multi-reward: equal-weight sum vs GDPO (components trained on)", "",
                  _multi_table(bench, results, multi), "",
                  "![components](multi_reward_components.png)", ""]
    return "\n".join(lines) + "\n"


def _monitor_table(result, keys) -> str:
    finals = [k for k in keys if k.endswith("_final")]
    lines = ["| method | " + " | ".join(k.removesuffix("_final") + " (final / drop from peak)" for k in finals) + " |",
             "|---|" + "---|" * len(finals)]
    for method, stats in result["methods"].items():
        cells = [f"{_cell(stats, k)} / {_cell(stats, k.removesuffix('_final') + '_drop_from_peak')}" for k in finals]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _diag_table(result) -> str:
    lines = ["| method | clip vs exact-KL disagreement | corr(log r, −KL) |", "|---|---|---|"]
    for method, stats in result["methods"].items():
        if "diag_clip_kl_disagree" in stats:
            lines.append(f"| {method} | {_cell(stats, 'diag_clip_kl_disagree')} | "
                         f"{_cell(stats, 'diag_corr_logr_negkl')} |")
    return "\n".join(lines)


def _study_table(study, axis: str) -> str:
    lines = [f"| method | {axis} | final reward | peak→final drop | final KL |", "|---|---|---|---|---|"]
    for method, by_value in study.items():
        for value in sorted(by_value):
            s = by_value[value]
            cells = [f"{s[k][0]:.3g} ± {s[k][1]:.2g}" if k in s else "–"
                     for k in ("final_reward", "peak_to_final_drop", "final_kl_ref")]
            lines.append(f"| {method} | {value} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _multi_table(bench, results, variants) -> str:
    names = [key.removeprefix("reward_") for key in bench.component_keys]
    lines = ["| method | aggregation | final reward (equal-weight mean) | "
             + " | ".join(f"final {n}" for n in names) + " | final KL to ref |",
             "|---|---|---|" + "---|" * len(names) + "---|"]
    for variant in variants:
        for method, stats in results[variant]["methods"].items():
            cells = [_cell(stats, f"reward_{n}_final") for n in names]
            lines.append(f"| {method} | {MULTI_MODES[variant]} | {_cell(stats, 'final_reward')} | "
                         + " | ".join(cells) + f" | {_cell(stats, 'final_kl_ref')} |")
    return "\n".join(lines)
