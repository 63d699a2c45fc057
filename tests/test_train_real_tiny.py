"""Training end to end through the real diffusers pipeline classes (tiny random weights, CPU).

For each family (SD3, FLUX.1, FLUX.2-klein) the shipped ``configs/tiny_<family>.yaml`` runs
its two iterations through the Trainer: rollout with CFG / guidance, rewards on decoded RGB
images, replay, DPPO loss, AdamW, evaluation, checkpoint with a diffusers LoRA export. Checks:
every LoRA weight that can receive a gradient changed (weight decay off, so only gradients
move them; ``lora_A`` first moves at the second step because ``lora_B`` starts at zero);
every logged metric is finite; the first update has ratio 1; the exported
``pytorch_lora_weights.safetensors`` loads with the family pipeline's ``load_lora_weights``
into a fresh tiny pipeline, changes its output, and reproduces the trained adapter's ODE
samples (independent path: the pipeline's own ``__call__``). The CLI runs the SD3 recipe.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from flowdppo.cli import main
from flowdppo.config import load_config, resolve
from flowdppo.trainer.commands import RECIPES
from real_models_helpers import (
    PROMPTS,
    noise_for,
    ode_sample,
    pipeline_latents,
    single_thread,  # noqa: F401 (autouse fixture)
    tiny_pipe,
)

REPO = Path(__file__).resolve().parent.parent
PROMPT_FILES = REPO / "examples" / "prompts"
FAMILIES = ["sd3", "flux", "flux2"]  # together ~10 s on one CPU thread (mostly imports)


def structurally_frozen(trainer) -> tuple[str, ...]:
    """LoRA weights no loss can reach. The last SD3 block is context_pre_only: its text-stream
    output is discarded, so its text query projection gets no gradient by construction.
    FLUX.1 / FLUX.2 double blocks keep both streams, and single blocks mix them."""
    if trainer.cfg.model.name != "sd3":
        return ()
    last = len(trainer.model.transformer.transformer_blocks) - 1
    return (f"transformer_blocks.{last}.attn.add_q_proj.",)


def overrides() -> list[str]:
    """Absolute prompt paths (tests may run from any directory); no weight decay, so a
    weight that moved got a gradient."""
    return [f"prompts.train_file={PROMPT_FILES / 'train.txt'}",
            f"prompts.eval_file={PROMPT_FILES / 'eval.jsonl'}",
            "optim.weight_decay=0.0", "eval.at_start=false", "device=cpu"]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_finite_numbers(row: dict, where: str) -> None:
    for key, value in row.items():
        if key == "diag_corr_logr_negkl":
            continue  # Pearson correlation of log r with -KL: undefined at r == 1 exactly
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert math.isfinite(value), (where, key, value)
        else:
            assert isinstance(value, str) and value not in ("nan", "inf", "-inf"), (where, key)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """family -> (trainer, weights before training, run directory); trains on first use."""
    from flowdppo.trainer.loop import Trainer

    runs: dict = {}

    def get(family: str):
        if family not in runs:
            out = tmp_path_factory.mktemp(f"tiny_{family}") / "run"
            cfg = load_config(str(RECIPES / f"tiny_{family}.yaml"), overrides())
            trainer = Trainer(resolve(cfg), out)
            before = {n: p.detach().clone() for n, p in trainer.params.items()}
            trainer.run()
            runs[family] = (trainer, before, out)
        return runs[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_training_moves_lora_and_logs_finite_metrics(family, trained):
    trainer, before, out = trained(family)
    assert type(trainer.model.pipe).__name__ == trainer.model.pipeline_class_name
    assert trainer.params and all(".lora_" in n for n in trainer.params)
    frozen = structurally_frozen(trainer)
    unchanged = {n for n, p in trainer.params.items() if torch.equal(before[n], p.detach())}
    expected = {n for n in trainer.params if n.startswith(frozen)}
    assert unchanged == expected, f"{family}: unchanged {sorted(unchanged)[:3]}, "\
        f"expected {sorted(expected)}"
    rows = read_rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["images_generated"] == 8
    for row in rows:
        assert_finite_numbers(row, "metrics.jsonl")
        assert row["grad_norm"] > 0 and row["reward_jpeg_compressibility"] < 0
        # Each rollout is replayed once, first thing, under the weights that sampled it.
        assert row["ratio_min"] == pytest.approx(1.0, abs=1e-5)
        assert row["ratio_max"] == pytest.approx(1.0, abs=1e-5)
        assert row["kl_old_new_max"] == pytest.approx(0.0, abs=1e-9)
    (evaluation,) = read_rows(out / "eval.jsonl")
    assert_finite_numbers(evaluation, "eval.jsonl")
    assert evaluation["kl_ref"] > 0  # the trained policy left the reference
    assert list((out / "samples").glob("eval_step_*.png"))


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_lora_loads_into_a_fresh_pipeline(family, trained):
    trainer, _, out = trained(family)
    latest = (out / "checkpoints" / "latest").read_text().strip()
    lora_dir = out / "checkpoints" / latest / "lora"
    assert (lora_dir / "pytorch_lora_weights.safetensors").is_file()
    gs = trainer.cfg.sampling.guidance_scale
    model = trainer.model
    noise = noise_for(model, len(PROMPTS))
    ours = ode_sample(model, PROMPTS, noise, 3, gs)

    fresh = tiny_pipe(family)  # the adapter's tiny-random base (seed 0)
    base = pipeline_latents(family, fresh, PROMPTS, noise, 3, gs)
    fresh.load_lora_weights(str(lora_dir))
    loaded = pipeline_latents(family, fresh, PROMPTS, noise, 3, gs)
    change = (loaded - base).abs().max()
    assert change > 1e-4, f"{family}: the LoRA did not change the pipeline's output"
    # Tolerance well below the change: a wrong scale (lost lora_alpha) or key would fail.
    torch.testing.assert_close(loaded, ours, atol=float(change) * 0.02, rtol=0)


def test_cli_trains_the_sd3_recipe(tmp_path, monkeypatch):
    """``flowdppo train --config configs/tiny_sd3.yaml`` from the repository root."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "cli"
    code = main(["train", "--config", "configs/tiny_sd3.yaml", "--output-dir", str(out),
                 "train.num_iterations=1", "eval.at_start=false", "device=cpu"])
    assert code == 0
    (row,) = read_rows(out / "metrics.jsonl")
    assert_finite_numbers(row, "metrics.jsonl")
    assert [r["step"] for r in read_rows(out / "eval.jsonl")] == [1]
    saved = load_config(str(out / "config.yaml"))
    assert saved.model.name == "sd3" and saved.model.pretrained == "tiny-random"
    assert list((out / "checkpoints").glob("step_*/lora/pytorch_lora_weights.safetensors"))
