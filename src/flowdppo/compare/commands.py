"""``flowdppo compare``: every method on one benchmark, same budget, several seeds, one report."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare", help="compare methods on a benchmark (tables + plots)",
        description="Train every method with the same prompts, seeds, images generated and "
                    "evaluation; write compare.md, compare.json and PNG plots.")
    parser.add_argument("--benchmark", default="digits", help="digits or shapes")
    parser.add_argument("--methods", default=None,
                        help="comma-separated (default: all): dppo,dppo_cps,grpo,cps,guard,nft,dppo_tv,dppo_pred")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (quick: the first)")
    parser.add_argument("--output-dir", default=None, help="default runs/compare_<benchmark>")
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, short runs, no sweep, no lr stress, updates 1/2/4 (a first look)")
    parser.add_argument("--no-sweep", action="store_true", help="use every method's scaled paper setting")
    parser.add_argument("--variants", default=None,
                        help="comma-separated subset of main,lr_x3,updates_2,updates_4,updates_8 "
                             "(default: all; quick: main,updates_2,updates_4)")
    parser.add_argument("--iterations", type=int, default=None, help="override iterations per run")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--jobs", type=int, default=None, help="runs in parallel (default: cores, max 4)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every run (repeatable)")
    parser.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    from .benchmarks import get_benchmark
    from .methods import DEFAULT_METHODS, get_method
    from .runner import (
        ALL_VARIANTS,
        QUICK_VARIANTS,
        execute,
        study_runs,
        sweep_runs,
        variant_overrides,
    )

    bench = with_overrides(get_benchmark(args.benchmark), args.overrides)
    methods = args.methods.split(",") if args.methods else list(DEFAULT_METHODS)
    for method in methods:
        get_method(method)  # unknown names fail before any run starts
    variants = args.variants.split(",") if args.variants else list(
        QUICK_VARIANTS if args.quick else ALL_VARIANTS)
    for variant in variants:
        variant_overrides(bench, variant)  # unknown names fail before any run starts
    seeds = [int(s) for s in args.seeds.split(",")]
    seeds = seeds[:1] if args.quick else seeds
    iterations = args.iterations or (bench.quick_iterations if args.quick else bench.iterations)
    root = Path(args.output_dir or f"runs/compare_{bench.name}")
    root.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    jobs = args.jobs or (1 if args.device.startswith("cuda") else max(1, min(4, cores)))
    threads = max(1, cores // jobs)
    start = time.perf_counter()
    _prepare_base(bench)
    factors: dict[str, float] = {}
    if not (args.quick or args.no_sweep):
        sweep = sweep_runs(bench, methods, iterations, args.device)
        execute(root, sweep, jobs, threads)
        factors = choose_factors(root, sweep)
    study = study_runs(bench, methods, seeds, iterations, factors, args.device, variants)
    execute(root, study, jobs, threads)
    outputs = write_report(root, bench, study, factors, time.perf_counter() - start)
    print("\n".join(f"wrote {p}" for p in outputs))
    return 0


def _prepare_base(bench) -> None:
    """Build a built-in base model once here, so parallel runs do not each pretrain it."""
    pretrained = bench.recipe["model"]["pretrained"]
    if pretrained.startswith("builtin:"):
        from ..trainer.setup import resolve_pretrained

        resolve_pretrained(pretrained)


def with_overrides(bench, overrides: list[str]):
    """The benchmark with ``KEY=VALUE`` overrides merged into its shared recipe (validated)."""
    import dataclasses

    from ..config import RunConfig, apply_overrides, from_dict

    if not overrides:
        return bench
    recipe = apply_overrides(json.loads(json.dumps(bench.recipe)), overrides)
    from_dict(RunConfig, recipe)  # unknown keys and wrong types fail before any run
    return dataclasses.replace(bench, recipe=recipe)


def choose_factors(root: Path, sweep) -> dict[str, float]:
    """Per method, the sweep factor with the best final validation reward."""
    from .report import load_run
    from .runner import run_dir

    best: dict[str, tuple[float, float]] = {}
    for spec in sweep:
        curve = load_run(run_dir(root, spec), spec.method, spec.seed)
        _, reward = curve.series("reward_mean")
        factor = float(spec.variant.removeprefix("sweep_x"))
        if len(reward) and (spec.method not in best or reward[-1] > best[spec.method][1]):
            best[spec.method] = (factor, float(reward[-1]))
    (root / "sweep.json").write_text(json.dumps(best, indent=2))
    return {m: f for m, (f, _) in best.items()}


def _group(root: Path, specs) -> dict[str, dict[str, list]]:
    from .report import load_run
    from .runner import run_dir

    by_variant: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for spec in specs:
        by_variant[spec.variant][spec.method].append(load_run(run_dir(root, spec), spec.method, spec.seed))
    return by_variant


def write_report(root: Path, bench, specs, factors: dict[str, float], wall_s: float) -> list[Path]:
    from . import plots
    from .report import aggregate, monitor_keys
    from .runner import MULTI_EPOCH_METHODS

    by_variant = _group(root, specs)
    images_per_step = (bench.recipe["sampling"]["num_groups"] * bench.recipe["sampling"]["group_size"])
    results: dict[str, Any] = {v: aggregate(m, bench.lower_is_better) for v, m in by_variant.items()}
    study = _multi_epoch_study(results, MULTI_EPOCH_METHODS)
    main = by_variant["main"]
    monitor_series = sorted({k for curves in main.values() for c in curves for k in c.eval_rows[-1]
                             if isinstance(c.eval_rows[-1][k], (int, float))
                             and k not in ("step", "reward_mean", "reward_std", "kl_ref", "kl_ref_max",
                                           "time_eval_s")})
    figures = [
        plots.curves_vs_images(main, "reward_mean", "in-domain reward", root / "reward_vs_images.png", images_per_step),
        plots.curves_vs_images(main, "kl_ref", "KL to reference", root / "kl_vs_images.png", images_per_step),
        plots.reward_vs_kl(main, root / "reward_vs_kl.png", results["main"]["kl_unit"]),
        plots.monitors_vs_images(main, monitor_series, root / "monitors_vs_images.png", images_per_step),
        plots.multi_epoch(study, root / "multi_epoch.png"),
        plots.noise_diagnostic(main, root / "noise_diagnostic.png"),
    ]
    payload = {"benchmark": bench.name, "wall_time_s": wall_s, "sweep_factors": factors,
               "variants": results, "multi_epoch": {m: {str(u): v for u, v in s.items()}
                                                     for m, s in study.items()}}
    (root / "compare.json").write_text(json.dumps(payload, indent=2))
    md = _markdown(bench, results, study, factors, wall_s, monitor_keys(results["main"]))
    (root / "compare.md").write_text(md)
    return [root / "compare.md", root / "compare.json", *figures]


def _multi_epoch_study(results: dict[str, Any], methods) -> dict[str, dict[int, dict[str, tuple[float, float]]]]:
    study: dict[str, dict[int, dict[str, tuple[float, float]]]] = {}
    for variant, result in results.items():
        updates = 1 if variant == "main" else (int(variant.split("_")[1]) if variant.startswith("updates_") else None)
        if updates is None:
            continue
        for method, stats in result["methods"].items():
            if method not in methods:
                continue
            study.setdefault(method, {})[updates] = {
                k: (stats[k]["mean"], stats[k]["std"])
                for k in ("final_reward", "peak_to_final_drop", "final_kl_ref") if k in stats}
    return study


def _markdown(bench, results, study, factors, wall_s, monitor_cols) -> str:
    from .report import markdown_table

    lines = [f"# flowdppo compare — {bench.name}", "",
             f"Wall time {wall_s / 60:.1f} min. KL to the reference: {results['main']['kl_unit']}; "
             f"matched-KL level {results['main']['matched_kl']:.3g}. Mean ± std over seeds.", ""]
    if factors:
        lines += ["Sweep factors chosen (× the scaled paper setting): "
                  + ", ".join(f"{m}: {f:g}" for m, f in sorted(factors.items())), ""]
    for variant in sorted(results, key=lambda v: (v != "main", v)):
        lines += [f"## {variant}", "", markdown_table(results[variant]), ""]
    lines += ["## Out-of-domain monitors and reward components (main)", "",
              _monitor_table(results["main"], monitor_cols), ""]
    lines += ["## Noise diagnostic (likelihood methods, main)", "", _diag_table(results["main"]), ""]
    if study:
        lines += ["## Multi-epoch study (updates per rollout)", "", _study_table(study), ""]
    return "\n".join(lines) + "\n"


def _monitor_table(result, keys) -> str:
    from .report import _cell

    finals = [k for k in keys if k.endswith("_final")]
    lines = ["| method | " + " | ".join(k.removesuffix("_final") + " (final / drop from peak)" for k in finals) + " |",
             "|---|" + "---|" * len(finals)]
    for method, stats in result["methods"].items():
        cells = [f"{_cell(stats, k)} / {_cell(stats, k.removesuffix('_final') + '_drop_from_peak')}" for k in finals]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _diag_table(result) -> str:
    from .report import _cell

    lines = ["| method | clip vs exact-KL disagreement | corr(log r, −KL) |", "|---|---|---|"]
    for method, stats in result["methods"].items():
        if "diag_clip_kl_disagree" in stats:
            lines.append(f"| {method} | {_cell(stats, 'diag_clip_kl_disagree')} | "
                         f"{_cell(stats, 'diag_corr_logr_negkl')} |")
    return "\n".join(lines)


def _study_table(study) -> str:
    lines = ["| method | updates | final reward | peak→final drop | final KL |", "|---|---|---|---|---|"]
    for method, by_updates in study.items():
        for updates in sorted(by_updates):
            s = by_updates[updates]
            cells = [f"{s[k][0]:.3g} ± {s[k][1]:.2g}" if k in s else "–"
                     for k in ("final_reward", "peak_to_final_drop", "final_kl_ref")]
            lines.append(f"| {method} | {updates} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
