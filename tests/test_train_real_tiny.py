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


PAPER_RECIPES = ["sd35_dppo", "sd35_dppo_cps", "sd35_grpo", "sd35_cps", "sd35_guard", "sd35_nft",
                 "flux2_dppo", "flux1_dppo"]
# App. F.2 (SPEC.md §5), written out here independently of the YAML files:
# name -> (model, hub id, LoRA r, alpha, steps, algorithm, sampler, threshold or clip range).
APP_F2 = {
    "sd35_dppo": ("sd3", "stabilityai/stable-diffusion-3.5-medium", 32, 64, 10, "dppo",
                  "flow_sde", 1e-7),
    "sd35_dppo_cps": ("sd3", "stabilityai/stable-diffusion-3.5-medium", 32, 64, 10, "dppo",
                      "cps", 1e-6),
    "sd35_grpo": ("sd3", "stabilityai/stable-diffusion-3.5-medium", 32, 64, 10, "grpo",
                  "flow_sde", 1e-4),
    "sd35_cps": ("sd3", "stabilityai/stable-diffusion-3.5-medium", 32, 64, 10, "cps", "cps", 1e-4),
    "sd35_guard": ("sd3", "stabilityai/stable-diffusion-3.5-medium", 32, 64, 10, "guard",
                   "flow_sde", 4e-6),
    "sd35_nft": ("sd3", "stabilityai/stable-diffusion-3.5-medium", 32, 64, 10, "nft", "ode", None),
    "flux2_dppo": ("flux2", "black-forest-labs/FLUX.2-klein-base-9B", 64, 128, 14, "dppo",
                   "flow_sde", 1e-7),
    "flux1_dppo": ("flux", "black-forest-labs/FLUX.1-dev", 64, 128, 10, "dppo", "flow_sde", 1e-7),
}


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipes_carry_the_app_f2_settings(name):
    # Dotted hub ids ("stable-diffusion-3.5-medium") are hub ids, not missing local paths.
    run = resolve(load_config(str(RECIPES / f"{name}.yaml")))
    cfg = run.config
    model, hub_id, rank, alpha, steps, algorithm, sampler, trust = APP_F2[name]
    assert (cfg.model.name, cfg.model.pretrained) == (model, hub_id)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.optim.lr) == (rank, alpha, 3e-4)
    assert cfg.model.kwargs["resolution"] == 512 and cfg.sampling.num_steps == steps
    assert (cfg.model.dtype, cfg.mixed_precision) == ("bf16", "bf16")
    assert (cfg.sampling.group_size, cfg.sampling.num_groups) == (16, 64)
    assert run.samples_per_iteration == 1024
    # 3 trained steps drawn from the first half of the schedule.
    assert (run.sde_steps.count, run.sde_steps.first, run.sde_steps.stop) == (3, 0, steps // 2)
    assert cfg.sampling.noise_level == 0.8 and cfg.sampling.eta == 0.8
    assert (run.algorithm.name, run.dynamics) == (algorithm, sampler)
    if algorithm == "dppo":
        assert run.hparams.threshold == trust and run.hparams.reduce == "mean"
    elif trust is not None:
        assert run.hparams.clip_range == trust and run.hparams.reduce == "mean"
    assert [item.name for item in cfg.rewards.items] == ["pickscore"]
    assert cfg.prompts.source == "files"
    for path in (cfg.prompts.train_file, cfg.prompts.eval_file):
        assert (REPO / path).is_file(), path


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state, fixed by the first Accelerator: a bf16 run
    after an fp32 one in the same process needs it reset (a real run is one process)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipe_runs_with_a_tiny_model(name, tmp_path, fresh_accelerate_state):
    """Each paper recipe as written (bf16 weights and autocast, its method, sampler, CFG or
    guidance embedding, gradient checkpointing), with only the weights, the reward, the image
    size and the batch shrunk: one iteration on the CPU."""
    from flowdppo.trainer.loop import Trainer

    shrink = [*overrides(), "model.pretrained=tiny-random",
              "model.kwargs={resolution: 64, max_sequence_length: 32}", "sampling.num_steps=6",
              "sampling.group_size=2", "sampling.num_groups=2", "sampling.sample_batch_size=4",
              "sampling.eval_num_steps=2", "rewards.items=[{name: jpeg_compressibility}]",
              "eval.monitors=[{name: diversity}]", "eval.max_prompts=1",
              "eval.samples_per_prompt=2", "train.num_iterations=1",
              "logging.progress_bar=false", "logging.tensorboard=false"]
    cfg = load_config(str(RECIPES / f"{name}.yaml"), shrink)
    trainer = Trainer(resolve(cfg), tmp_path / name)
    assert trainer.model.dtype == torch.bfloat16
    trainer.run()
    (row,) = read_rows(tmp_path / name / "metrics.jsonl")
    assert_finite_numbers(row, "metrics.jsonl")
    assert row["grad_norm"] > 0
    (evaluation,) = read_rows(tmp_path / name / "eval.jsonl")
    assert_finite_numbers(evaluation, "eval.jsonl")
    assert "diversity" in evaluation


def test_sd35_recipe_trains_from_a_dotted_hub_id_in_the_offline_cache(
        tmp_path, monkeypatch, fresh_accelerate_state):
    """The recipe's path for real weights: a hub id with dots passes validation and loads
    from the local Hugging Face cache with HF_HUB_OFFLINE=1 (a tiny pipeline stands in)."""
    from flowdppo.trainer.loop import Trainer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    repo = cache / "models--flowdppo-test--tiny-stable-diffusion-3.5-medium"
    tiny_pipe("sd3").save_pretrained(repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    shrink = [*overrides(), "model.pretrained=flowdppo-test/tiny-stable-diffusion-3.5-medium",
              f"model.kwargs={{resolution: 64, max_sequence_length: 32, cache_dir: '{cache}'}}",
              "sampling.group_size=2", "sampling.num_groups=2", "sampling.sample_batch_size=4",
              "sampling.eval_num_steps=2", "rewards.items=[{name: jpeg_compressibility}]",
              "eval.monitors=[]", "eval.max_prompts=1", "eval.samples_per_prompt=2",
              "train.num_iterations=1", "logging.progress_bar=false"]
    trainer = Trainer(resolve(load_config(str(RECIPES / "sd35_dppo.yaml"), shrink)),
                      tmp_path / "run")
    trainer.run()
    (row,) = read_rows(tmp_path / "run" / "metrics.jsonl")
    assert_finite_numbers(row, "metrics.jsonl")
    # The base weights are the cached pipeline's, loaded in the recipe's bf16.
    reference = tiny_pipe("sd3").transformer.transformer_blocks[0].attn.to_q.weight
    loaded = dict(trainer.model.pipe.transformer.named_parameters())
    base = loaded["transformer_blocks.0.attn.to_q.base_layer.weight"]
    assert base.dtype == torch.bfloat16 and torch.equal(base, reference.to(torch.bfloat16))
