"""Wan 2.1 text-to-video adapter against diffusers' WanPipeline (tiny random weights, CPU):
5-D latents (B, 16, 2, 4, 4) for 5 frames of 32 x 32 px, through the adapter, the pipeline,
and the whole trainer (every method and sampler)."""

from __future__ import annotations

import pytest
import torch

from family_helpers import (
    Spec,
    check_cfg_one_batch,
    check_decode,
    check_first_update_is_on_policy,
    check_gradient_checkpointing,
    check_load_directory,
    check_lora_roundtrip,
    check_ode_parity,
    check_trained_lora,
    lora_modules_in,
    make,
    read_rows,
    train_overrides,
    train_tiny_recipe,
)
from flowdppo.cli import main
from flowdppo.models import build_model
from flowdppo.models.tiny import build_tiny_pipeline
from flowdppo.models.wan import WanModel
from flowdppo.rewards.base import REWARDS, register_reward
from real_models_helpers import PROMPTS, SEQ, single_thread  # noqa: F401 (autouse fixture)

SPEC = Spec("wan", WanModel, resolution=32, options={"num_frames": 5}, negative="")
VIDEO_REWARD = "test_video_brightness"

if VIDEO_REWARD not in REWARDS:
    @register_reward(VIDEO_REWARD)
    def _video_brightness(device: str = "cpu"):
        """Mean brightness of a video batch (B, F, 3, H, W): stands in for the video rewards."""
        def reward(images, prompts, metadata):
            assert images.ndim == 5 and images.shape[1:3] == (5, 3), images.shape
            return images.mean(dim=(1, 2, 3, 4)), {}
        return reward


def video_overrides() -> list[str]:
    return [*train_overrides(), f"rewards.items=[{{name: {VIDEO_REWARD}}}]"]


def test_registry_builds_tiny_random_with_5d_latents():
    model = build_model("wan", pretrained="tiny-random", dtype="fp32", resolution=32,
                        num_frames=5, max_sequence_length=SEQ)
    assert isinstance(model, WanModel) and model.flow_shift == 3.0  # UniPC's flow_shift
    assert model.latent_shape == (16, 2, 4, 4)  # (C, F', H/8, W/8), F' = (5 - 1) / 4 + 1
    assert model.initial_noise(3).shape == (3, 16, 2, 4, 4)
    cond = model.encode_prompts(PROMPTS)
    assert cond.tensors["prompt_embeds"].shape == (2, SEQ, 32)
    rect = WanModel.from_pipeline(model.pipe, resolution=32, num_frames=9, height=16, width=48)
    assert rect.latent_shape == (16, 3, 2, 6)


def test_lora_targets_self_and_cross_attention():
    from peft import LoraConfig

    model = make(SPEC)
    model.transformer.add_adapter(LoraConfig(r=2, target_modules=list(model.lora_target_modules)))
    wrapped = lora_modules_in(model.transformer)
    assert len(wrapped) == 8 * len(model.transformer.blocks)
    assert {"blocks.0.attn1.to_q", "blocks.1.attn2.to_out.0"} <= wrapped


def test_training_grid_is_flowmatch_euler_with_the_shipped_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    model = WanModel.from_pipeline(build_tiny_pipeline("wan"), resolution=32, num_frames=5)
    assert isinstance(model.pipe.scheduler, UniPCMultistepScheduler)  # as the checkpoints ship
    euler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    euler.set_timesteps(10)
    assert torch.equal(model.sigmas(10), euler.sigmas.to(torch.float64))
    assert float(model.sigmas(10)[-2]) < 0.01  # a first-order grid: the last step is tiny
    shipped = WanModel.from_pipeline(model.pipe, resolution=32, num_frames=5,
                                     train_grid="scheduler").sigmas(10)
    model.pipe.scheduler.set_timesteps(10)
    assert torch.equal(shipped, model.pipe.scheduler.sigmas.to(torch.float64))
    assert float(shipped[-2]) > 0.2  # UniPC's grid ends with a large step
    assert WanModel.from_pipeline(model.pipe, resolution=32, num_frames=5,
                                  flow_shift=5.0).sigmas(4)[1] > model.sigmas(4)[1]


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_ode_parity_with_pipeline(guidance_scale):
    # WanPipeline driven by FlowMatchEulerDiscreteScheduler(shift=3). Measured max |diff|:
    # 0.0 at w = 1, 1.7e-6 at w = 4.5.
    assert check_ode_parity(SPEC, guidance_scale) < 2e-5


def test_cfg_runs_one_batch_with_both_halves_in_the_graph():
    check_cfg_one_batch(SPEC)


def test_decode_returns_frames_matching_the_pipeline():
    check_decode(SPEC, (5, 3, 32, 32))


def test_lora_export_loads_into_pipeline(tmp_path, caplog):
    check_lora_roundtrip(SPEC, tmp_path, guidance_scale=4.5, caplog=caplog)


def test_gradient_checkpointing():
    check_gradient_checkpointing(SPEC)


def test_load_from_directory(tmp_path):
    check_load_directory(SPEC, tmp_path)


def test_tiny_recipe_trains_and_exports_a_loadable_lora(tmp_path, caplog):
    trainer = train_tiny_recipe(SPEC, tmp_path / "run", video_overrides())
    rows = read_rows(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    check_first_update_is_on_policy(rows)
    (evaluation,) = read_rows(tmp_path / "run" / "eval.jsonl")
    assert evaluation["kl_ref"] > 0
    check_trained_lora(SPEC, trainer, tmp_path / "run", caplog)


METHODS = {  # name -> overrides: every method and sampler on 5-D latents
    "dppo_tv_cps": ["algorithm.hparams={threshold: 0.01, divergence: tv, reduce: mean}",
                    "sampling.dynamics=cps"],
    "grpo": ["algorithm.name=grpo", "algorithm.hparams={clip_range: 1.0e-4, reduce: mean}"],
    "cps": ["algorithm.name=cps",
            "algorithm.hparams={clip_range: 1.0e-4, log_prob_norm: simple, reduce: mean}"],
    "guard": ["algorithm.name=guard", "algorithm.hparams={clip_range: 4.0e-6, reduce: mean}"],
    "nft": ["algorithm.name=nft", "algorithm.hparams={beta: 1.0, adv_max: 5.0}"],
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_on_video_latents(method, tmp_path):
    train_tiny_recipe(SPEC, tmp_path / method,
                      [*video_overrides(), *METHODS[method], "train.num_iterations=1"])
    (row,) = read_rows(tmp_path / method / "metrics.jsonl")
    assert row["grad_norm"] > 0
    if method != "nft":  # a forward method has no sampling log-probabilities
        check_first_update_is_on_policy([row])


def test_cli_trains_the_wan_recipe(tmp_path, monkeypatch):
    """``flowdppo train --config configs/tiny_wan.yaml`` from the repository root."""
    from accelerate.state import AcceleratorState

    from family_helpers import REPO

    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.chdir(REPO)
    code = main(["train", "--config", "configs/tiny_wan.yaml", "--output-dir",
                 str(tmp_path / "cli"), *video_overrides(), "train.num_iterations=1"])
    assert code == 0
    assert list((tmp_path / "cli" / "checkpoints").glob("step_*/lora/*.safetensors"))


def test_errors():
    pipe = build_tiny_pipeline("wan")
    with pytest.raises(ValueError, match=r"num_frames=6: Wan needs 4k \+ 1 frames \(e.g. 5\)"):
        WanModel.from_pipeline(pipe, resolution=32, num_frames=6)
    with pytest.raises(ValueError, match="width=40"):
        WanModel.from_pipeline(pipe, resolution=32, num_frames=5, width=40)
    with pytest.raises(ValueError, match="train_grid"):
        WanModel.from_pipeline(pipe, resolution=32, num_frames=5, train_grid="unipc")
    model = make(SPEC)
    with pytest.raises(ValueError, match="x_t has shape"):
        model.predict_velocity(torch.zeros(2, 16, 3, 4, 4), torch.ones(2),
                               model.encode_prompts(PROMPTS))


@pytest.mark.parametrize("name, hub_id, checkpointing, batch", [
    ("wan21_t2v_dppo", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", False, 8),
    ("wan21_t2v_14b_dppo", "Wan-AI/Wan2.1-T2V-14B-Diffusers", True, 2)])
def test_recipes_carry_the_anchor_settings_and_run_with_a_tiny_model(
        name, hub_id, checkpointing, batch, tmp_path):
    from family_helpers import run_recipe_with_a_tiny_model
    from flowdppo.config import load_config, resolve
    from flowdppo.trainer.commands import RECIPES

    run = resolve(load_config(str(RECIPES / f"{name}.yaml")))
    cfg = run.config
    assert (cfg.model.name, cfg.model.pretrained) == ("wan", hub_id)
    assert cfg.model.kwargs == {"resolution": 240, "height": 240, "width": 416,
                                "num_frames": 33, "max_sequence_length": 512}
    assert (cfg.sampling.num_steps, cfg.sampling.guidance_scale, cfg.optim.lr) == (20, 4.5, 1e-4)
    assert cfg.model.gradient_checkpointing == checkpointing
    assert cfg.sampling.sample_batch_size == cfg.train.micro_batch_size == batch
    run_recipe_with_a_tiny_model(SPEC, name, tmp_path / "run",
                                 [f"rewards.items=[{{name: {VIDEO_REWARD}}}]"])
