"""The tuned protocol's report: held-out table with bootstrap intervals of the difference to
the reference method (DPPO when compared, else the first method), each method's working
range, every grid point, the reward-vs-KL frontier and knob-vs-reward curves."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from . import plots
from .claims import check_claims, claims_table
from .methods import get_method
from .report import KL_UNIT, _cell, aggregate, markdown_table, run_summary
from .runner import MULTI_MODES
from .tuned import SettingResult, TunedPlan
from .tuning import TIE_TOL, WORKING_TOL, Selection, bootstrap_diff_ci, working_range

RULE = ("On the tuning seeds only, each grid point (knob factor x learning rate) is the mean of "
        "its final evaluation reward and final KL to the reference over those seeds; among the "
        "points with mean final KL <= the KL budget the highest mean final reward wins, points "
        f"within {TIE_TOL} of it count as tied and the lowest mean KL among them wins (then the "
        "smaller factor, then the smaller lr). If no point fits the budget, the lowest-KL point "
        "is chosen (flagged). The chosen point is then run on the held-out seeds, which the "
        "selection never sees.")


def _per_seed(curves, bench) -> dict[int, dict[str, float]]:
    return {c.seed: run_summary(c, math.nan, bench.lower_is_better) for c in curves if len(c.eval_rows) >= 2}


def _per_seed_all(result: SettingResult, bench) -> dict[str, dict[int, dict[str, float]]]:
    return {m: _per_seed(curves, bench) for m, curves in result.heldout.items()}


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)),
            "min": float(np.min(values)), "max": float(np.max(values)), "n": len(values)}


def heldout_table(result: SettingResult, bench) -> tuple[str, dict[str, Any]]:
    """The held-out rows (markdown) and their numbers (JSON), differences paired by seed."""
    per_seed = {m: _per_seed(c, bench) for m, c in result.heldout.items()}
    ref = "dppo" if "dppo" in per_seed else next(iter(per_seed))
    lines = [f"| method | knob | factor | knob value | lr | n | final reward (mean ± std, min–max) | "
             f"final KL to ref | Δ reward vs {ref} [95% CI] | Δ KL vs {ref} [95% CI] |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    numbers: dict[str, Any] = {}
    for method, seeds in per_seed.items():
        best, preset = result.selections[method].best, get_method(method)
        order = sorted(set(seeds) & set(per_seed[ref]))
        row: dict[str, Any] = {"knob": preset.knob, "factor": best.factor, "lr": best.lr,
                               "knob_value": preset.knob_value(bench.latent_elements, best.factor),
                               "per_seed": {str(s): {k: seeds[s][k] for k in ("final_reward", "final_kl_ref")}
                                            for s in sorted(seeds)}}
        for key in ("final_reward", "final_kl_ref"):
            row[key] = _stats([seeds[s][key] for s in sorted(seeds)])
            if method != ref and order:
                diff, low, high = bootstrap_diff_ci([seeds[s][key] for s in order],
                                                    [per_seed[ref][s][key] for s in order])
                row[f"{key}_diff_to_{ref}"] = {"diff": diff, "low": low, "high": high, "seeds": order}
        numbers[method] = row
        r, k = row["final_reward"], row["final_kl_ref"]
        cells = [_diff_cell(row.get(f"{key}_diff_to_{ref}")) for key in ("final_reward", "final_kl_ref")]
        lines.append(f"| {method} | {preset.knob} | ×{best.factor:.3g} | {row['knob_value']:.3g} | "
                     f"{best.lr:.3g} | {r['n']} | {r['mean']:.3f} ± {r['std']:.3f} ({r['min']:.3f}–"
                     f"{r['max']:.3f}) | {k['mean']:.3g} ± {k['std']:.2g} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines), {"reference": ref, "methods": numbers}


def _diff_cell(d: dict[str, float] | None) -> str:
    return "–" if d is None else f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def grid_edges(selection: Selection) -> list[str]:
    """Which ends of the grid the chosen point sits on (its optimum may lie beyond them)."""
    factors = sorted({p.factor for p in selection.points})
    lrs = sorted({p.lr for p in selection.points})
    best, edges = selection.best, []
    for name, value, values in (("factor", best.factor, factors), ("lr", best.lr, lrs)):
        if len(values) > 1 and value == values[0]:
            edges.append(f"smallest {name}")
        elif len(values) > 1 and value == values[-1]:
            edges.append(f"largest {name}")
    return edges


def range_table(selections: dict[str, Selection]) -> tuple[str, dict[str, Any]]:
    lines = [f"| method | chosen (factor, lr) | tuning reward | tuning KL | within budget | share of grid "
             f"within {WORKING_TOL} | share of knob grid at chosen lr | factor span | chosen at grid edge |",
             "|---|---|---|---|---|---|---|---|---|"]
    numbers = {}
    for method, sel in selections.items():
        wr, b = working_range(sel), sel.best
        edges = grid_edges(sel)
        numbers[method] = {"share_of_grid": wr.share_of_grid, "share_of_knob": wr.share_of_knob,
                           "factor_low": wr.factor_low, "factor_high": wr.factor_high,
                           "factor_span": wr.factor_span, "grid_edges": edges}
        lines.append(f"| {method} | ×{b.factor:.3g}, {b.lr:.3g} | {b.reward:.3f} | {b.kl:.3g} | "
                     f"{'yes' if sel.within_budget else '**no**'} | {wr.share_of_grid:.2f} | "
                     f"{wr.share_of_knob:.2f} | {wr.factor_span:.3g}× (×{wr.factor_low:.3g}–×{wr.factor_high:.3g}) | "
                     f"{', '.join(edges) or 'no'} |")
    return "\n".join(lines), numbers


def grid_table(selections: dict[str, Selection], bench) -> tuple[str, list[dict[str, Any]]]:
    lines = ["| method | factor | knob value | lr | tuning reward | tuning KL | chosen |",
             "|---|---|---|---|---|---|---|"]
    rows = []
    for method, sel in selections.items():
        preset = get_method(method)
        for p in sel.points:
            value = preset.knob_value(bench.latent_elements, p.factor)
            chosen = p == sel.best
            rows.append({"method": method, "factor": p.factor, "knob_value": value, "lr": p.lr,
                         "reward": p.reward, "kl": p.kl, "seeds": list(p.seeds), "chosen": chosen})
            lines.append(f"| {method} | ×{p.factor:.3g} | {value:.3g} | {p.lr:.3g} | {p.reward:.3f} | "
                         f"{p.kl:.3g} | {'**yes**' if chosen else ''} |")
    return "\n".join(lines), rows


def write_tuned_report(root: Path, bench, plan: TunedPlan, results: dict[str, SettingResult],
                       wall_s: float, iterations: int, tuning_from: str | None = None) -> list[Path]:
    source = ("" if tuning_from is None else
              f" Tuning results taken from `{tuning_from}` (its recorded grid; the tuning runs were "
              "not rerun here, the selection rule was applied afresh).")
    lines = [f"# flowdppo compare --protocol tuned — {bench.name}", "",
             f"This command's wall time {wall_s / 60:.1f} min (runs finished by an earlier command are reused and not counted); "
             f"{iterations} iterations per run.{source} Grid: knob factors "
             + ", ".join(f"×{f:.3g}" for f in plan.factors) + " (× each method's scaled paper value); "
             f"learning rates {', '.join(f'{lr:.3g}' for lr in plan.lrs)}. Tuning seeds "
             f"{list(plan.tuning_seeds)}; held-out seeds {list(plan.heldout_seeds)}; KL budget "
             f"{plan.kl_budget:g} ({KL_UNIT}).", "", f"Selection rule: {RULE}", ""]
    payload: dict[str, Any] = {"benchmark": bench.name, "protocol": "tuned", "wall_time_s": wall_s,
                               "iterations": iterations, "tuning_from": tuning_from,
                               "rule": RULE, "kl_budget": plan.kl_budget, "kl_unit": KL_UNIT,
                               "factors": list(plan.factors), "lrs": list(plan.lrs),
                               "tuning_seeds": list(plan.tuning_seeds),
                               "heldout_seeds": list(plan.heldout_seeds), "settings": {}}
    figures: list[Path] = []
    for setting, result in results.items():
        if result.transferred_from is not None:
            figures += _transfer_section(root, setting, result, bench, lines, payload)
            continue
        held_md, held = heldout_table(result, bench)
        range_md, ranges = range_table(result.selections)
        grid_md, grid = grid_table(result.selections, bench)
        summary = aggregate(result.heldout, bench.lower_is_better)
        figures += _setting_figures(root, setting, result, bench)
        lines += [f"## {setting}: held-out seeds at each method's chosen point", "", held_md, "",
                  "All columns of the standard table, held-out seeds:", "", markdown_table(summary), "",
                  f"## {setting}: working range (tuning seeds)", "", range_md, "",
                  f"![frontier](frontier_{setting}.png) ![knob](knob_vs_reward_{setting}.png)", "",
                  f"## {setting}: every grid point (tuning seeds)", "", grid_md, ""]
        payload["settings"][setting] = {"heldout": held, "heldout_aggregate": summary,
                                        "working_range": ranges, "grid": grid,
                                        "within_budget": {m: s.within_budget for m, s in result.selections.items()}}
    claims = check_claims({key: _per_seed_all(result, bench) for key, result in results.items()},
                          monitors=[f"{k}_final" for k in bench.forgetting_monitors],
                          lower_is_better=bench.lower_is_better,
                          components=[f"{k}_final" for k in bench.component_keys])
    if claims:
        lines += ["## The paper's claims on these held-out runs", "", claims_table(claims), "",
                  "Verdict rules: `src/flowdppo/compare/claims.py`. With few seeds the intervals "
                  "are coarse: a difference not shown is not a difference ruled out.", ""]
        payload["claims"] = [dataclasses.asdict(c) for c in claims]
    (root / "compare.json").write_text(json.dumps(payload, indent=2))
    (root / "compare.md").write_text("\n".join(lines) + "\n")
    return [root / "compare.md", root / "compare.json", *figures]


def _transfer_section(root: Path, key: str, result: SettingResult, bench, lines: list[str],
                      payload: dict[str, Any]) -> list[Path]:
    """A stress variant run at another setting's chosen points: held-out tables only (its
    grid is that setting's), plus the reward components when it trains on them."""
    variant = key.split("@")[0]
    held_md, held = heldout_table(result, bench)
    summary = aggregate(result.heldout, bench.lower_is_better)
    name = key.replace("@", "_at_")
    lines += [f"## {variant} at the points chosen for {result.transferred_from} (held-out seeds, "
              "not tuned for this variant)", "", held_md, "",
              "All columns of the standard table, held-out seeds:", "", markdown_table(summary), "",
              _change_table(held, payload["settings"][result.transferred_from]["heldout"], variant,
                            result.transferred_from), ""]
    if variant in MULTI_MODES:
        names = [k.removeprefix("reward_") for k in bench.component_keys]
        lines += [f"Reward components ({MULTI_MODES[variant]}), final, held-out seeds:", "",
                  "| method | " + " | ".join(names) + " | min component |",
                  "|---|" + "---|" * (len(names) + 1)]
        for method, stats in summary["methods"].items():
            means = [stats.get(f"reward_{n}_final", {}).get("mean", math.nan) for n in names]
            lines.append(f"| {method} | " + " | ".join(_cell(stats, f"reward_{n}_final") for n in names)
                         + f" | {min(means):.3f} |")
        lines.append("")
    images_per_step = bench.recipe["sampling"]["num_groups"] * bench.recipe["sampling"]["group_size"]
    figures = [plots.curves_vs_images(result.heldout, "reward_mean", f"held-out reward ({key})",
                                      root / f"heldout_reward_{name}.png", images_per_step)]
    lines.append(f"![held-out reward](heldout_reward_{name}.png)")
    if variant in MULTI_MODES:  # each component's curve, the aggregate's own being above
        figures.append(plots.monitors_vs_images(result.heldout, list(bench.component_keys),
                                                root / f"components_{name}.png", images_per_step))
        lines.append(f"![components](components_{name}.png)")
    lines.append("")
    payload["settings"][key] = {"transferred_from": result.transferred_from, "heldout": held,
                                "heldout_aggregate": summary}
    return figures


def _change_table(moved: dict[str, Any], source: dict[str, Any], variant: str, source_name: str) -> str:
    """Per method, the change from the source setting to ``variant`` at the same point, paired
    by held-out seed: what the stress costs each method (the table above compares methods)."""
    lines = [f"Change from {source_name} to {variant}, same method and point, paired by seed:", "",
             "| method | Δ final reward [95% CI] | Δ final KL [95% CI] |", "|---|---|---|"]
    for method, row in moved["methods"].items():
        before = source["methods"].get(method, {}).get("per_seed", {})
        seeds = sorted(set(row["per_seed"]) & set(before), key=int)
        cells = []
        for key in ("final_reward", "final_kl_ref"):
            if key == "final_reward" and variant in MULTI_MODES:
                cells.append("– (another reward)")  # the aggregate is not the source's reward
                continue
            if not seeds:
                cells.append("–")
                continue
            diff, low, high = bootstrap_diff_ci([row["per_seed"][s][key] for s in seeds],
                                                [before[s][key] for s in seeds])
            row.setdefault("change_from_source", {})[key] = {"diff": diff, "low": low, "high": high}
            cells.append(_diff_cell({"diff": diff, "low": low, "high": high}))
        lines.append(f"| {method} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def _setting_figures(root: Path, setting: str, result: SettingResult, bench) -> list[Path]:
    images_per_step = bench.recipe["sampling"]["num_groups"] * bench.recipe["sampling"]["group_size"]
    return [
        plots.grid_frontier(result.selections, root / f"frontier_{setting}.png", KL_UNIT),
        plots.knob_vs_reward(result.selections, root / f"knob_vs_reward_{setting}.png"),
        plots.curves_vs_images(result.heldout, "reward_mean", f"held-out reward ({setting})",
                               root / f"heldout_reward_{setting}.png", images_per_step),
    ]
