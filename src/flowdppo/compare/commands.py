"""``flowdppo compare``: every method on one benchmark, same budget, several seeds, one report.

Two protocols: ``standard`` (each method at its scaled paper setting, or the best of a small
sweep, over the stress variants) and ``tuned`` (an equal tuning grid per method on tuning
seeds, the chosen point reported on held-out seeds; ``tuned.py``). Either way finished runs
are reused, and a failing report keeps every run and prints the command that rebuilds it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare", help="compare methods on a benchmark (tables + plots)",
        description="Train every method with the same prompts, seeds, images generated and "
                    "evaluation; write compare.md, compare.json and PNG plots.")
    parser.add_argument("--benchmark", default="digits", help="digits or shapes")
    parser.add_argument("--protocol", choices=("standard", "tuned"), default="standard",
                        help="standard: paper settings (or a small sweep) over the variants; tuned: "
                             "a knob x lr grid per method on tuning seeds, the best point on held-out seeds")
    parser.add_argument("--methods", default=None,
                        help="comma-separated (default: all; tuned: dppo,grpo,guard,nft): "
                             "dppo,dppo_cps,grpo,cps,guard,nft,dppo_tv,dppo_pred")
    parser.add_argument("--seeds", default="0,1,2",
                        help="comma-separated seeds (quick: the first; tuned: the default held-out seeds)")
    parser.add_argument("--output-dir", default=None, help="default runs/compare_<benchmark>")
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, short runs, no sweep, no lr stress, updates 1/2/4 (a first look); "
                             "tuned: short runs only")
    parser.add_argument("--no-sweep", action="store_true", help="use every method's scaled paper setting")
    parser.add_argument("--variants", default=None,
                        help="comma-separated subset of main,lr_x3,updates_<n>,lag_<k>,multi_sum,multi_gdpo "
                             "(default: main,lr_x3,updates_2,updates_4,updates_8; quick: main,updates_2,"
                             "updates_4; tuned: main, each variant a setting tuned on its own)")
    parser.add_argument("--iterations", type=int, default=None, help="override iterations per run")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--jobs", type=int, default=None, help="runs in parallel (default: cores, max 4)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every run (repeatable)")
    tuned = parser.add_argument_group("tuned protocol")
    tuned.add_argument("--grid-points", type=int, default=7, help="knob grid points, log-spaced (default 7)")
    tuned.add_argument("--grid-span", type=float, default=1000.0,
                       help="largest / smallest knob factor, centred on the scaled paper value (default 1000)")
    tuned.add_argument("--lrs", default=None,
                       help="comma-separated learning rates (default: the benchmark's x 0.3, 1, 3)")
    tuned.add_argument("--tuning-seeds", default="1000,1001", help="seeds the selection sees (default 1000,1001)")
    tuned.add_argument("--heldout-seeds", default=None, help="seeds of the reported runs (default: --seeds)")
    tuned.add_argument("--kl-budget", type=float, default=1.0,
                       help="selection's bound on the mean final KL to the reference (default 1.0)")
    tuned.add_argument("--transfer", default=None,
                       help="comma-separated stress variants (updates_<n>, lag_<k>, multi_sum, "
                            "multi_gdpo) run on the held-out seeds at the points chosen for the "
                            "first tuned setting, without tuning of their own")
    tuned.add_argument("--tuning-from", default=None, metavar="COMPARE_JSON",
                       help="take the tuning results from an earlier tuned report's compare.json "
                            "(same benchmark, iterations, grid and tuning seeds) instead of "
                            "rerunning the grid; held-out and transfer runs still run")
    parser.set_defaults(func=run_compare)


def rebuild_command(args: argparse.Namespace) -> str:
    """The ``flowdppo compare`` command line of ``args`` (rerunning it reuses finished runs)."""
    parts = ["flowdppo", "compare"]
    for flag in ("benchmark", "protocol", "methods", "seeds", "output_dir", "variants", "iterations",
                 "device", "jobs", "grid_points", "grid_span", "lrs", "tuning_seeds",
                 "heldout_seeds", "kl_budget", "transfer", "tuning_from"):
        value = getattr(args, flag, None)
        if value is not None:
            parts += ["--" + flag.replace("_", "-"), str(value)]
    parts += [flag for flag in ("--quick", "--no-sweep") if getattr(args, flag[2:].replace("-", "_"))]
    for item in args.overrides:
        parts += ["--set", item]
    return shlex.join(parts)


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"{flag}={text!r}: expected comma-separated integers, e.g. 0,1,2") from None


def run_compare(args: argparse.Namespace) -> int:
    from .benchmarks import get_benchmark
    from .methods import DEFAULT_METHODS, TUNED_METHODS, get_method
    from .runner import ALL_VARIANTS, QUICK_VARIANTS, variant_overrides

    tuned = args.protocol == "tuned"
    if args.tuning_from and not tuned:
        raise ValueError("--tuning-from needs --protocol tuned (the standard protocol has no tuning grid)")
    bench = with_overrides(get_benchmark(args.benchmark), args.overrides)
    methods = args.methods.split(",") if args.methods else list(TUNED_METHODS if tuned else DEFAULT_METHODS)
    for method in methods:
        get_method(method)  # unknown names fail before any run starts
    default_variants = ("main",) if tuned else QUICK_VARIANTS if args.quick else ALL_VARIANTS
    variants = args.variants.split(",") if args.variants else list(default_variants)
    for variant in variants:
        variant_overrides(bench, variant)  # unknown names fail before any run starts
    iterations = args.iterations or (bench.quick_iterations if args.quick else bench.iterations)
    root = Path(args.output_dir or f"runs/compare_{bench.name}")
    root.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    jobs = args.jobs or (1 if args.device.startswith("cuda") else max(1, min(4, cores)))
    context = (root, bench, methods, variants, iterations, jobs, max(1, cores // jobs))
    plan = _tuned_plan(args, bench) if tuned else None
    recorded = _recorded_tuning(args, bench, methods, variants, plan, iterations) if tuned else None
    start = time.perf_counter()
    _prepare_base(bench)
    report = (_tuned(args, plan, recorded, *context, start) if tuned
              else _standard(args, *context, start))
    try:
        outputs = report()
    except Exception as err:  # any report fault: the runs are safe, say how to rebuild
        logger.exception("writing the report failed")
        runs = sum(1 for _ in (root / "runs").glob("**/eval.jsonl"))
        print(f"flowdppo compare: error: writing the report failed ({type(err).__name__}: {err}). "
              f"Nothing is lost: the {runs} finished runs stay under {root / 'runs'}. Rebuild the "
              f"report with\n  {rebuild_command(args)}\n(finished runs are reused, none is redone).",
              file=sys.stderr)
        return 1
    print("\n".join(f"wrote {p}" for p in outputs))
    return 0


def _standard(args, root, bench, methods, variants, iterations, jobs, threads, start):
    """Run the standard protocol; returns the report writer."""
    from .runner import execute, study_runs, sweep_runs
    from .study_report import write_report

    seeds = _ints(args.seeds, "--seeds")
    seeds = seeds[:1] if args.quick else seeds
    factors: dict[str, float] = {}
    if not (args.quick or args.no_sweep):
        sweep = sweep_runs(bench, methods, iterations, args.device)
        execute(root, sweep, jobs, threads)
        factors = choose_factors(root, sweep)
    study = study_runs(bench, methods, seeds, iterations, factors, args.device, variants)
    if not study:
        raise ValueError(f"no runs planned: variants {variants} run none of the methods {methods} "
                         "(updates_<n> runs dppo, dppo_cps, grpo and cps only)")
    execute(root, study, jobs, threads)
    return lambda: write_report(root, bench, study, factors, time.perf_counter() - start)


def _tuned_plan(args, bench):
    from .tuned import TunedPlan
    from .tuning import log_grid

    lr = bench.recipe["optim"]["lr"]
    try:
        lrs = tuple(float(x) for x in args.lrs.split(",")) if args.lrs else (0.3 * lr, lr, 3 * lr)
    except ValueError:
        raise ValueError(f"--lrs={args.lrs!r}: expected comma-separated numbers, e.g. 3e-4,1e-3") from None
    heldout = args.heldout_seeds or args.seeds
    return TunedPlan(log_grid(args.grid_points, args.grid_span), lrs,
                     tuple(_ints(args.tuning_seeds, "--tuning-seeds")),
                     tuple(_ints(heldout, "--heldout-seeds")), args.kl_budget)


def _recorded_tuning(args, bench, methods, variants, plan, iterations):
    """``--tuning-from``'s selections, read and checked before any expensive work."""
    from .tuned import recorded_selections

    if args.tuning_from is None:
        return None
    return recorded_selections(Path(args.tuning_from), bench, methods, variants, plan, iterations)


def _tuned(args, plan, recorded, root, bench, methods, variants, iterations, jobs, threads, start):
    """Run the tuned protocol; returns the report writer."""
    from .runner import execute
    from .tuned import run_tuned
    from .tuned_report import write_tuned_report

    transfers = [v for v in (args.transfer or "").split(",") if v]
    if "lr_x3" in transfers:
        raise ValueError("--transfer lr_x3: the tuned protocol grids the learning rate itself (--lrs)")
    results = run_tuned(root, bench, methods, variants, plan, iterations, args.device,
                        lambda r, specs: execute(r, specs, jobs, threads), transfers, recorded)
    return lambda: write_tuned_report(root, bench, plan, results, time.perf_counter() - start,
                                      iterations, args.tuning_from)


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
        if len(reward) and (spec.method not in best or reward[-1] > best[spec.method][1]):
            best[spec.method] = (spec.factor, float(reward[-1]))
    (root / "sweep.json").write_text(json.dumps(best, indent=2))
    return {m: f for m, (f, _) in best.items()}
