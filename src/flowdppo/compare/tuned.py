"""``flowdppo compare --protocol tuned``: an equal tuning budget per method, held-out seeds.

For each setting (``--variants``, default ``main``) and method: every point of the grid
(the method's trust-region knob at ``factors`` x its scaled paper value, crossed with the
learning rates) runs on the tuning seeds; :func:`tuning.select_best` picks one point from
those runs alone; only then is that point run on the held-out seeds, which the selection
never sees (their runs do not exist when it happens). Held-out run directories are named
after the chosen point, so a different choice never reuses a stale run.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .benchmarks import Benchmark
from .methods import get_method
from .report import RunCurves, load_run
from .runner import MULTI_EPOCH_METHODS, RunSpec, deep_merge, make_run, run_dir, variant_overrides
from .tuning import PointResult, PointSummary, Selection, select_best, select_point

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TunedPlan:
    factors: tuple[float, ...]  # knob factors (x each method's scaled paper value)
    lrs: tuple[float, ...]  # learning rates
    tuning_seeds: tuple[int, ...]
    heldout_seeds: tuple[int, ...]
    kl_budget: float  # in the evaluation's KL unit (report.KL_UNIT)

    def __post_init__(self) -> None:
        overlap = sorted(set(self.tuning_seeds) & set(self.heldout_seeds))
        if overlap:
            raise ValueError(f"--tuning-seeds and --heldout-seeds share {overlap}: held-out seeds "
                             "must never be used for tuning; pick disjoint seeds")
        if not self.tuning_seeds or not self.heldout_seeds:
            raise ValueError("--tuning-seeds and --heldout-seeds each need at least one seed")
        if not self.lrs or not all(lr > 0 and math.isfinite(lr) for lr in self.lrs):
            raise ValueError(f"--lrs={list(self.lrs)}: need positive finite learning rates")
        if not self.kl_budget > 0:
            raise ValueError(f"--kl-budget={self.kl_budget}: must be > 0")


@dataclass(frozen=True)
class SettingResult:
    """One setting's outcome: per method the selection and its held-out runs."""

    selections: dict[str, Selection]
    heldout: dict[str, list[RunCurves]]
    # A stress setting run at another setting's chosen points (not tuned on its own).
    transferred_from: str | None = None


def point_label(setting: str, factor: float, lr: float) -> str:
    return f"{setting}_x{factor:.4g}_lr{lr:.3g}"


# Tuning runs are read at their final evaluation only (the selection rule, the frontier and
# the knob curves use nothing else), so they skip the base and intermediate evaluations
# and the image grids: a third of a digits run's time.
FINAL_EVAL_ONLY = {"eval": {"every": 0, "at_start": False, "grid": False}}


def _point_run(bench: Benchmark, method: str, seed: int, variant: str, setting: str, factor: float,
               lr: float, iterations: int, device: str, final_eval_only: bool = False) -> RunSpec:
    extra = deep_merge(variant_overrides(bench, setting), {"optim": {"lr": lr}})
    if final_eval_only:  # `extra` is merged last, over the benchmark's evaluation cadence
        extra = deep_merge(extra, FINAL_EVAL_ONLY)
    return make_run(bench, method, seed, variant, iterations, factor, extra, device)


def tuning_runs(bench: Benchmark, methods: Sequence[str], plan: TunedPlan, setting: str,
                iterations: int, device: str) -> list[RunSpec]:
    """Every grid point of every method on the tuning seeds (points with an invalid knob,
    e.g. a TV threshold >= 1, are left out with a warning)."""
    if setting == "lr_x3":
        raise ValueError("variant 'lr_x3' cannot be a tuned setting: the tuned protocol grids the "
                         "learning rate itself (--lrs)")
    runs = []
    for method in methods:
        preset = get_method(method)
        for factor in plan.factors:
            if not preset.valid_factor(bench.latent_elements, factor):
                logger.warning("%s: knob factor %g gives %s=%g, outside its range; point skipped",
                               method, factor, preset.knob, preset.knob_value(bench.latent_elements, factor))
                continue
            for lr in plan.lrs:
                variant = "tune_" + point_label(setting, factor, lr)
                runs += [_point_run(bench, method, seed, variant, setting, factor, lr, iterations,
                                    device, final_eval_only=True)
                         for seed in plan.tuning_seeds]
    return runs


def point_result(root: Path, spec: RunSpec) -> PointResult:
    """A finished run's final evaluation reward and KL (NaN when it logged no evaluation)."""
    curve = load_run(run_dir(root, spec), spec.method, spec.seed)
    _, reward = curve.series("reward_mean")
    _, kl = curve.series("kl_ref")
    return PointResult(spec.factor, float(spec.config["optim"]["lr"]), spec.seed,
                       float(reward[-1]) if len(reward) else math.nan,
                       float(kl[-1]) if len(kl) else math.nan)


def select_all(root: Path, runs: Sequence[RunSpec], plan: TunedPlan) -> dict[str, Selection]:
    """Per method, the selection from its tuning runs (the held-out seeds are not passed)."""
    by_method: dict[str, list[PointResult]] = {}
    for spec in runs:
        by_method.setdefault(spec.method, []).append(point_result(root, spec))
    return {m: select_best(results, plan.tuning_seeds, kl_budget=plan.kl_budget)
            for m, results in by_method.items()}


def recorded_selections(path: Path, bench: Benchmark, methods: Sequence[str], settings: Sequence[str],
                        plan: TunedPlan, iterations: int) -> dict[str, dict[str, Selection]]:
    """Per setting and method, the selection from the grid recorded in an earlier tuned report
    (its ``compare.json``) instead of rerunning the tuning runs: the rule is applied afresh to
    the recorded per-point means. The report must match this plan (benchmark, iterations,
    factors, learning rates, tuning seeds) point for point, so a recorded grid is never
    silently taken for another one."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--tuning-from {path}: cannot read it as a tuned report's compare.json ({err})") from None
    if report.get("protocol") != "tuned":
        raise ValueError(f"--tuning-from {path}: not a tuned report (protocol={report.get('protocol')!r})")
    expected = {"benchmark": bench.name, "iterations": iterations, "tuning_seeds": list(plan.tuning_seeds)}
    for key, want in expected.items():
        if report.get(key) != want:
            raise ValueError(f"--tuning-from {path}: its {key} is {report.get(key)!r}, this run's is "
                             f"{want!r}; pass the matching flag or tune afresh without --tuning-from")
    for key, want in (("factors", plan.factors), ("lrs", plan.lrs)):
        got = report.get(key) or []
        if len(got) != len(want) or not all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(got, want)):
            raise ValueError(f"--tuning-from {path}: its grid {key}={got} differ from this run's "
                             f"{list(want)}; pass the same --grid-points/--grid-span/--lrs")
    out: dict[str, dict[str, Selection]] = {}
    for setting in settings:
        rows = report.get("settings", {}).get(setting, {}).get("grid")
        if not rows:
            raise ValueError(f"--tuning-from {path}: no tuned grid for setting {setting!r}")
        out[setting] = {}
        for method in methods:
            points = [PointSummary(r["factor"], r["lr"], r["reward"], r["kl"], tuple(r["seeds"]))
                      for r in rows if r["method"] == method]
            if not points:
                raise ValueError(f"--tuning-from {path}: setting {setting!r} has no grid for method "
                                 f"{method!r}; drop it from --methods or tune it afresh")
            out[setting][method] = select_point(points, kl_budget=plan.kl_budget)
    return out


def heldout_runs(bench: Benchmark, selections: dict[str, Selection], plan: TunedPlan, setting: str,
                 iterations: int, device: str) -> list[RunSpec]:
    runs = []
    for method, selection in selections.items():
        best = selection.best
        variant = "heldout_" + point_label(setting, best.factor, best.lr)
        runs += [_point_run(bench, method, seed, variant, setting, best.factor, best.lr, iterations, device)
                 for seed in plan.heldout_seeds]
    return runs


# Transferred stress variants run for the methods of their study only: multi-epoch reuse for
# the likelihood-ratio methods of the multi-epoch study, the multi-reward study for DPPO and
# GRPO (issue 14); staleness for every method.
TRANSFER_STUDIES = {"updates_": MULTI_EPOCH_METHODS, "multi_": ("dppo", "grpo")}


def transfer_methods(variant: str, methods: Sequence[str]) -> list[str]:
    for prefix, study in TRANSFER_STUDIES.items():
        if variant.startswith(prefix):
            return [m for m in methods if m in study]
    return list(methods)


def transfer_key(variant: str, source: str) -> str:
    """The result key of stress variant ``variant`` run at setting ``source``'s points."""
    return f"{variant}@{source}"


def run_tuned(root: Path, bench: Benchmark, methods: Sequence[str], settings: Sequence[str],
              plan: TunedPlan, iterations: int, device: str, execute,
              transfers: Sequence[str] = (),
              recorded: dict[str, dict[str, Selection]] | None = None) -> dict[str, SettingResult]:
    """Tune (all settings' grids in one batch of runs), select, then run the held-out seeds.

    ``transfers``: stress variants (``updates_4``, ``lag_2``, ``multi_gdpo``, ...) run on the
    held-out seeds at each method's point chosen for the first setting, with no tuning of
    their own: how a method tuned in one regime holds up when the regime changes (more
    reuse, staler rollouts, other rewards). ``execute(root, specs)`` runs the unfinished
    specs (finished ones are reused). ``recorded``: selections from an earlier report
    (:func:`recorded_selections`); the tuning runs are then not run at all."""
    if transfers and not settings:
        raise ValueError("--transfer needs a tuned setting to take the points from")
    for variant in transfers:
        variant_overrides(bench, variant)  # unknown names fail before any run starts
    if recorded is None:
        grids = {s: tuning_runs(bench, methods, plan, s, iterations, device) for s in settings}
        execute(root, [spec for runs in grids.values() for spec in runs])
        selections = {s: select_all(root, grids[s], plan) for s in settings}
    else:
        selections = {s: recorded[s] for s in settings}
    held = {s: heldout_runs(bench, selections[s], plan, s, iterations, device) for s in settings}
    source = settings[0] if settings else ""
    for variant in transfers:
        chosen = {m: selections[source][m] for m in transfer_methods(variant, methods)}
        held[transfer_key(variant, source)] = heldout_runs(bench, chosen, plan, variant, iterations,
                                                           device)
    execute(root, [spec for runs in held.values() for spec in runs])
    out = {}
    for key, specs in held.items():
        curves: dict[str, list[RunCurves]] = {}
        for spec in specs:
            curves.setdefault(spec.method, []).append(load_run(run_dir(root, spec), spec.method, spec.seed))
        from_setting = source if key not in selections else None
        out[key] = SettingResult(selections[key if from_setting is None else source], curves,
                                 from_setting)
    return out
