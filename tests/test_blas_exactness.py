"""The first update is exact whatever BLAS kernel the machine picks.

CPUs round matrix products differently by instruction set (MKL's AVX-512, AVX2 and SSE4.2
kernels; AMD machines often get the SSE4.2 path) and by batch shape and thread count. The
rollout's no-grad forward and the update's grad-mode forward see different batch shapes,
so their means may differ in the last bits; the trainer makes the first step exact by
construction (its own forward defines the old means). Each instruction set needs its own
process: MKL reads ``MKL_ENABLE_INSTRUCTIONS`` when it loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = str(Path(__file__).with_name("exactness_probe.py"))


def _probe(base: Path, out: Path, instructions: str, threads: int, *extra: str) -> dict:
    env = {**os.environ, "MKL_ENABLE_INSTRUCTIONS": instructions, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run([sys.executable, PROBE, str(base), str(out), str(threads), *extra],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _assert_exact(row: dict) -> None:
    assert row["kl_old_new_mean"] == 0.0 and row["kl_old_new_max"] == 0.0, row
    assert row["ratio_min"] == row["ratio_max"] == 1.0, row
    assert row["mask_frac"] == 0.0, row  # DPPO masks nothing before the policy moved


@pytest.mark.parametrize("instructions", [
    "SSE4_2", pytest.param("AVX2", marks=pytest.mark.slow)])
def test_first_update_is_exact_under_each_instruction_set(tiny_base, tmp_path, instructions):
    # Micro-batches of 5 entries straddle samples and leave a short last one (other shapes
    # than the rollout's batch of 6 samples).
    row = _probe(tiny_base, tmp_path / "run", instructions, 2, "train.micro_batch_size=5")
    _assert_exact(row)
    assert row["num_threads"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("instructions", ["SSE4_2", "AVX2", "AVX512"])
@pytest.mark.parametrize("micro", ["64", "5", "1"])
def test_first_update_is_exact_on_every_kernel_shape_and_thread_count(
        tiny_base, tmp_path, instructions, threads, micro):
    row = _probe(tiny_base, tmp_path / "run", instructions, threads, f"train.micro_batch_size={micro}")
    _assert_exact(row)
