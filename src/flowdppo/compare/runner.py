"""Planning and running the comparison's training runs (each a ``flowdppo train`` process).

Every run gets the same prompts, seeds, rollout budget (images generated) and evaluation;
only the method's overrides differ. Runs execute as subprocesses, ``jobs`` at a time, each
with ``cores / jobs`` threads; a finished run is never redone, so an interrupted
comparison continues where it stopped when the command is repeated.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .benchmarks import Benchmark
from .methods import SWEEP_FACTORS, get_method

logger = logging.getLogger(__name__)

SWEEP_SEED = 1000  # the validation seed of the sweep, never a reported seed
MULTI_EPOCH_METHODS = ("dppo", "dppo_cps", "grpo", "cps")


@dataclass(frozen=True)
class RunSpec:
    variant: str  # sweep_x<factor>, main, lr_x3, updates_<n>, lag_<k>, multi_*, tune_*, heldout_*
    method: str
    seed: int
    config: dict[str, Any]
    factor: float = 1.0  # the method's knob, x its scaled paper value

    @property
    def name(self) -> str:
        return f"{self.variant}/{self.method}/seed{self.seed}"


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def make_run(bench: Benchmark, method: str, seed: int, variant: str, iterations: int,
             factor: float = 1.0, extra: dict[str, Any] | None = None,
             device: str = "auto") -> RunSpec:
    preset = get_method(method)
    config = deep_merge(bench.recipe, preset.overrides(bench.latent_elements, factor))
    config = deep_merge(config, {"seed": seed, "device": device,
                                 "train": {"num_iterations": iterations},
                                 "eval": {"every": bench.eval_every}})
    config = deep_merge(config, extra or {})
    return RunSpec(variant, method, seed, config, factor)


def sweep_runs(bench: Benchmark, methods: Sequence[str], iterations: int, device: str) -> list[RunSpec]:
    return [make_run(bench, m, SWEEP_SEED, f"sweep_x{f:g}", iterations, f, device=device)
            for m in methods for f in SWEEP_FACTORS]


ALL_VARIANTS = ("main", "lr_x3", "updates_2", "updates_4", "updates_8")
QUICK_VARIANTS = ("main", "updates_2", "updates_4")
# Opt-in axes (not in the default set): staleness, and two ways to combine reward components.
EXTRA_VARIANTS = ("lag_1", "lag_2", "lag_4", "multi_sum", "multi_gdpo")
KNOWN_VARIANTS = ALL_VARIANTS + EXTRA_VARIANTS
MULTI_MODES = {"multi_sum": "weighted_sum", "multi_gdpo": "gdpo"}


def _numbered(variant: str, prefix: str) -> int | None:
    tail = variant.removeprefix(prefix)
    return int(tail) if variant.startswith(prefix) and tail.isdigit() else None


def variant_overrides(bench: Benchmark, variant: str) -> dict[str, Any]:
    """The stress axes: ``lr_x3`` triples the learning rate; ``updates_<n>`` reuses each
    rollout for n passes (n x the optimizer steps per rollout); ``lag_<k>`` trains on
    rollouts of the policy of k iterations before (``train.policy_lag``); ``multi_sum`` and
    ``multi_gdpo`` train on the benchmark's reward components with equal weights, combined
    by a weighted sum or by GDPO (per-reward group normalisation)."""
    if variant == "main":
        return {}
    if variant == "lr_x3":
        return {"optim": {"lr": 3 * bench.recipe["optim"]["lr"]}}
    if (updates := _numbered(variant, "updates_")) is not None:
        return {"train": {"num_updates": updates}}
    if (lag := _numbered(variant, "lag_")) is not None:
        return {"train": {"policy_lag": lag}}
    if variant in MULTI_MODES:
        if not bench.multi_rewards:
            raise ValueError(f"variant {variant!r} needs a benchmark with reward components; "
                             f"{bench.name!r} has none (use --benchmark digits)")
        items = [dict(item) for item in bench.multi_rewards]
        return {"rewards": {"items": items}, "advantages": {"mode": MULTI_MODES[variant]}}
    raise ValueError(f"unknown variant {variant!r}: expected one of {KNOWN_VARIANTS} "
                     "(updates_<n> and lag_<k> take any n, k)")


def study_runs(bench: Benchmark, methods: Sequence[str], seeds: Sequence[int], iterations: int,
               factors: dict[str, float], device: str, variants: Sequence[str]) -> list[RunSpec]:
    """The main comparison plus the stress axes; the multi-epoch variants (``updates_*``)
    run for the methods of the multi-epoch study only (GRPO vs DPPO, SDE and CPS), the
    others for every method given."""
    runs = []
    for variant in variants:
        extra = variant_overrides(bench, variant)
        for method in methods:
            if variant.startswith("updates_") and method not in MULTI_EPOCH_METHODS:
                continue
            for seed in seeds:
                runs.append(make_run(bench, method, seed, variant, iterations,
                                     factors.get(method, 1.0), extra, device))
    return runs


def run_dir(root: Path, spec: RunSpec) -> Path:
    return root / "runs" / spec.variant / spec.method / f"seed{spec.seed}"


def is_complete(path: Path, iterations: int) -> bool:
    eval_file = path / "eval.jsonl"
    if not eval_file.is_file():
        return False
    rows = [json.loads(line) for line in eval_file.read_text().splitlines() if line.strip()]
    return bool(rows) and rows[-1]["step"] >= iterations


def execute(root: Path, specs: Sequence[RunSpec], jobs: int, threads: int) -> list[Path]:
    """Run every incomplete spec; returns the run directories in ``specs`` order."""
    todo = [s for s in specs if not is_complete(run_dir(root, s), s.config["train"]["num_iterations"])]
    logger.info("%d runs planned, %d to do (%d jobs x %d threads)", len(specs), len(todo), jobs, threads)
    started = time.perf_counter()
    done = 0

    def one(spec: RunSpec) -> None:
        nonlocal done
        _run_one(root, spec, threads)
        done += 1
        logger.info("[%d/%d] %s done (%.0f s elapsed)", done, len(todo), spec.name,
                    time.perf_counter() - started)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in [pool.submit(one, spec) for spec in todo]:
            future.result()
    return [run_dir(root, s) for s in specs]


def _run_one(root: Path, spec: RunSpec, threads: int) -> None:
    path = run_dir(root, spec)
    if path.exists():
        shutil.rmtree(path)  # an unfinished run restarts from scratch: results stay comparable
    path.parent.mkdir(parents=True, exist_ok=True)
    config_file = path.parent / f"seed{spec.seed}.yaml"
    config_file.write_text(yaml.safe_dump({**spec.config, "output_dir": str(path)}, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "flowdppo.cli", "train", "--config", str(config_file),
               "--output-dir", str(path)]
    log_file = path.parent / f"seed{spec.seed}.log"
    with open(log_file, "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if result.returncode != 0:
        tail = log_file.read_text()[-2000:]
        raise RuntimeError(f"run {spec.name} failed (exit {result.returncode}); log {log_file}:\n{tail}")
