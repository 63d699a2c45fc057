"""Two processes over gloo (torchrun, CPU) train exactly like one process with the same
global batch: rewards and group statistics are gathered, rollout noise is keyed per global
sample, DDP averages gradients and metrics are reduced across processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from conftest import tiny_overrides


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _run(prefix: list[str], out: Path, overrides: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*prefix, "-m", "flowdppo.cli", "train", "--config", "toy_dppo",
                             "--output-dir", str(out), *overrides],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _close(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=2e-4, abs_tol=1e-6) or (math.isnan(a) and math.isnan(b))
    return a == b


def test_two_gloo_processes_equal_one_process(tiny_base, tmp_path):
    # Groups of 4 over 2 processes of 6 images each: the second group spans both.
    overrides = [*tiny_overrides(tiny_base, iterations=2), "sampling.group_size=4",
                 "sampling.num_groups=3", "train.minibatches_per_pass=1", "checkpoint.every=2"]
    _run([sys.executable], tmp_path / "one", overrides)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run(torchrun, tmp_path / "two", overrides)
    for name in ("metrics.jsonl", "eval.jsonl"):
        one, two = _rows(tmp_path / "one" / name), _rows(tmp_path / "two" / name)
        assert len(one) == len(two) == (2 if name == "metrics.jsonl" else 3)
        for row_one, row_two in zip(one, two):
            keys = [k for k in row_one if not k.startswith("time_")]
            bad = {k: (row_one[k], row_two.get(k)) for k in keys if not _close(row_one[k], row_two.get(k))}
            assert not bad, f"{name} step {row_one['step']}: {bad}"
