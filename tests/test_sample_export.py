"""``flowdppo sample`` and ``flowdppo export`` against the diffusers pipelines (issue 13,
items 2 and 5), on tiny random SD3 / FLUX.1 / FLUX.2-klein runs trained for one iteration.

Parity is checked with the pipeline's own ``__call__`` as a diffusers user would run it:
the base pipeline, ``load_lora_weights`` of the run's LoRA file, and
``generator=torch.Generator().manual_seed(seed)``; and for merged weights, the folder
loaded by ``<Pipeline>.from_pretrained`` with no adapter. All at fp32 on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flowdppo.cli import main
from flowdppo.config import load_config, resolve
from flowdppo.trainer.commands import RECIPES
from flowdppo.trainer.inference import load_policy, sample_images, seeded_noise
from real_models_helpers import (
    PROMPTS,
    RES,
    SEQ,
    noise_for,
    pipeline_latents,
    single_thread,  # noqa: F401 (autouse fixture)
    tiny_pipe,
)

REPO = Path(__file__).resolve().parent.parent
FAMILIES = ["sd3", "flux", "flux2"]
STEPS, SEEDS = 3, [7, 8]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """family -> run directory of one training iteration of ``configs/tiny_<family>.yaml``."""
    from flowdppo.trainer.loop import Trainer

    runs: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in runs:
            out = tmp_path_factory.mktemp(f"run_{family}") / "run"
            prompts = REPO / "examples" / "prompts"
            cfg = load_config(str(RECIPES / f"tiny_{family}.yaml"), [
                f"prompts.train_file={prompts / 'train.txt'}", "train.num_iterations=1",
                f"prompts.eval_file={prompts / 'eval.jsonl'}", "device=cpu"])
            Trainer(resolve(cfg), out).run()
            runs[family] = out
        return runs[family]

    return get


def lora_dir(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip() / "lora"


def pipeline_images(pipe, prompt: str, seeds: list[int], guidance: float) -> torch.Tensor:
    """What a diffusers user gets: one ``pipe(...)`` call per seed, images in [0, 1]."""
    with torch.no_grad():
        return torch.cat([pipe(prompt=prompt, generator=torch.Generator().manual_seed(s), height=RES,
                               width=RES, num_inference_steps=STEPS, guidance_scale=guidance,
                               max_sequence_length=SEQ, output_type="pt").images
                          for s in seeds])


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_matches_the_pipeline_with_the_lora_loaded(family, trained):
    run = trained(family)
    loaded = load_policy(run, device="cpu")
    guidance = loaded.config.sampling.guidance_scale
    prompts = [PROMPTS[1]] * len(SEEDS)
    ours = sample_images(loaded.model, prompts, seeded_noise(loaded.model, SEEDS), STEPS,
                         guidance)
    pipe = tiny_pipe(family)
    base = pipeline_images(pipe, PROMPTS[1], SEEDS, guidance)
    pipe.load_lora_weights(str(lora_dir(run)))
    theirs = pipeline_images(pipe, PROMPTS[1], SEEDS, guidance)
    diff = float((ours - theirs).abs().max())
    print(f"{family}: sample vs pipeline max abs diff {diff:.2e}")
    assert ours.shape == theirs.shape == (2, 3, RES, RES)
    assert (theirs - base).abs().max() > 1e-4  # the LoRA matters at this tolerance
    assert (ours[0] - ours[1]).abs().max() > 0.05  # two seeds, two images
    assert diff < 1e-5


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path)).astype(np.int16)


def test_sample_cli_writes_pngs_a_grid_and_a_manifest(trained, tmp_path, capsys):
    run = trained("sd3")
    out = tmp_path / "s"
    assert main(["sample", "--run", str(run), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                 "--num", "2", "--seed", "7", "--steps", str(STEPS), "--device", "cpu",
                 "--reward", "jpeg_compressibility", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in rows] == [
        (PROMPTS[0], 7), (PROMPTS[0], 8), (PROMPTS[1], 7), (PROMPTS[1], 8)]
    assert all(r["reward_jpeg_compressibility"] < 0 and r["steps"] == STEPS for r in rows)
    assert (out / "grid.png").is_file()
    pipe = tiny_pipe("sd3")
    pipe.load_lora_weights(str(lora_dir(run)))
    with torch.no_grad():
        pil = pipe(prompt=PROMPTS[1], generator=torch.Generator().manual_seed(8), height=RES, width=RES,
                   num_inference_steps=STEPS, guidance_scale=rows[0]["guidance_scale"],
                   max_sequence_length=SEQ).images[0]
    # 8-bit files: equal up to a rounding flip at a .5 boundary
    assert np.abs(_png(out / "p01_s0008.png") - np.asarray(pil).astype(np.int16)).max() <= 1


def test_sample_from_a_lora_file_and_seed_offsets(trained, tmp_path):
    """--lora: base pipeline + load_lora_weights; image j of seed S is image 0 of seed S + j."""
    run = trained("flux2")
    lora = lora_dir(run) / "pytorch_lora_weights.safetensors"
    common = ["sample", "--lora", str(lora), "--model", "flux2", "--pretrained", "tiny-random",
              "--dtype", "fp32", "--prompt", PROMPTS[0], "--steps", str(STEPS), "--device",
              "cpu", "--guidance", "4.0"]
    assert main([*common, "--num", "2", "--seed", "3", "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--num", "1", "--seed", "4", "--out", str(tmp_path / "b")]) == 0
    assert np.array_equal(_png(tmp_path / "a" / "p00_s0004.png"),
                          _png(tmp_path / "b" / "p00_s0004.png"))
    pipe = tiny_pipe("flux2")
    pipe.load_lora_weights(str(lora.parent))
    with torch.no_grad():
        pil = pipe(prompt=PROMPTS[0], generator=torch.Generator().manual_seed(3), height=RES, width=RES,
                   num_inference_steps=STEPS, guidance_scale=4.0,
                   max_sequence_length=SEQ).images[0]
    assert np.abs(_png(tmp_path / "a" / "p00_s0003.png") - np.asarray(pil)).max() <= 1


@pytest.mark.parametrize("num", ["0", "-2"])
def test_sample_rejects_a_non_positive_num(num, tmp_path, capsys):
    assert main(["sample", "--run", str(tmp_path), "--prompt", "x", "--num", num]) == 2
    assert f"--num {num}: need at least 1 image per prompt" in capsys.readouterr().err


def test_toy_run_samples_with_the_seed_rule(tiny_base, tmp_path):
    from fast_runs import tiny_overrides

    run = tmp_path / "toy"
    assert main(["train", "--output-dir", str(run), *tiny_overrides(tiny_base, iterations=1)]) == 0
    out = tmp_path / "s"
    assert main(["sample", "--run", str(run), "--prompt", "a handwritten seven", "--num", "2",
                 "--seed", "5", "--out", str(out)]) == 0
    model = load_policy(run, device="cpu").model
    noise = model.initial_noise(1, torch.Generator().manual_seed(6))  # image 1 of seed 5
    image = sample_images(model, ["a handwritten seven"], noise, 3, 1.0)[0, 0]
    expected = (image.numpy() * 255).round()
    assert np.abs(_png(out / "p00_s0006.png") - expected).max() <= 1


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_export_loads_without_adapter_and_matches_the_lora(family, trained, tmp_path):
    run = trained(family)
    out = tmp_path / "merged"
    assert main(["export", "--run", str(run), "--format", "merged", "--out", str(out)]) == 0
    cls = type(tiny_pipe(family))
    merged = cls.from_pretrained(str(out))
    assert not any("lora" in name for name, _ in merged.transformer.named_parameters())
    assert not getattr(merged.transformer, "peft_config", None)
    with_lora = tiny_pipe(family)
    with_lora.load_lora_weights(str(lora_dir(run)))
    guidance = load_config(str(run / "config.yaml")).sampling.guidance_scale
    noise = noise_for(load_policy(run, device="cpu").model, len(PROMPTS))
    expected = pipeline_latents(family, with_lora, PROMPTS, noise, STEPS, guidance)
    got = pipeline_latents(family, merged, PROMPTS, noise, STEPS, guidance)
    base = pipeline_latents(family, tiny_pipe(family), PROMPTS, noise, STEPS, guidance)
    diff = float((got - expected).abs().max())
    print(f"{family}: merged vs LoRA max abs diff {diff:.2e}")
    assert (expected - base).abs().max() > 1e-4
    assert diff < 1e-5
    assert "Flow-DPPO merged weights" in (out / "README.md").read_text()


def test_lora_export_has_the_file_and_a_model_card(trained, tmp_path):
    run = trained("sd3")
    out = tmp_path / "lora"
    assert main(["export", "--run", str(run), "--format", "lora", "--step", "1",
                 "--out", str(out)]) == 0
    weights = out / "pytorch_lora_weights.safetensors"
    assert weights.read_bytes() == (lora_dir(run) / weights.name).read_bytes()
    card = (out / "README.md").read_text()
    evaluation = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    for text in ("base_model: tiny-random", "Flow-DPPO", "jpeg_compressibility",
                 "StableDiffusion3Pipeline", "pipe.load_lora_weights", "| LoRA | r 4, alpha 8 |",
                 f"| reward_mean | {evaluation['reward_mean']:.6g} |", "(training_curve.png)"):
        assert text in card, text
    assert (out / "training_curve.png").read_bytes()[:4] == b"\x89PNG"
    pipe = tiny_pipe("sd3")
    pipe.load_lora_weights(str(out))  # loads as exported


def test_export_errors_are_one_line(trained, tmp_path, capsys):
    run = trained("sd3")
    assert main(["export", "--run", str(run), "--step", "9", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--step 9" in err and "it has steps [1]" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "junk").write_text("x")
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "full")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
