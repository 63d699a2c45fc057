"""bench/model_specs.py: the full-size Qwen-Image / Wan 14B presets are the published models
(parameter counts and latent shapes, built on the meta device: no memory), and the tiny
presets run through bench/throughput.py on the CPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_throughput_specs", BENCH / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(BENCH))  # its sibling modules, as when run as a script
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))
        sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("name, params, latent", [
    ("qwenimage", 20.43e9, (16, 64, 64)), ("wan14b", 14.29e9, (16, 9, 30, 52))])
def test_full_size_presets_are_the_published_models(bench, name, params, latent):
    specs = bench.MODEL_SPECS
    preset = specs.FAMILY_PRESETS[name]
    model = specs.build_family_model(preset, preset.resolution, preset.text_tokens,
                                     torch.device("meta"), torch.bfloat16)
    count = sum(p.numel() for p in model.transformer.parameters())
    assert count == pytest.approx(params, rel=1e-3)
    assert model.latent_shape == latent and model.dtype == torch.bfloat16
    assert name in bench.ALL_MODELS


@pytest.mark.parametrize("name", ["tiny_qwenimage", "tiny_wan"])
def test_tiny_presets_run_the_benchmark(bench, name, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = bench.main(["--model", name, "--device", "cpu", "--repeats", "1", "--no-flops",
                           "--num-steps", "4", "--trained-steps", "2", "--replays", "1",
                           "--num-updates", "1", "--json", str(tmp_path / "r.json")])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["model"] == name and report["rows"][0]["iteration_ms"] > 0
