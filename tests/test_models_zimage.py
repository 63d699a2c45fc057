"""Z-Image adapter against diffusers' ZImagePipeline (tiny random weights, CPU)."""

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
    train_tiny_recipe,
)
from flowdppo.models import build_model
from flowdppo.models.zimage import ZImageModel, zimage_timestep
from real_models_helpers import PROMPTS, SEQ, single_thread  # noqa: F401 (autouse fixture)

SPEC = Spec("zimage", ZImageModel, negative="")


def test_registry_builds_tiny_random():
    model = build_model("zimage", pretrained="tiny-random", dtype="fp32")
    assert isinstance(model, ZImageModel) and model.negative_prompt == ""
    assert model.latent_shape == (16, 8, 8) and model.max_sequence_length == SEQ
    cond = model.encode_prompts(PROMPTS)
    assert cond.tensors["prompt_embeds"].shape == (2, SEQ, 16)
    assert cond.tensors["prompt_embeds_mask"].sum(1).tolist()[0] < SEQ


def test_encoding_does_not_template_twice():
    """The pipeline rewrites a list prompt in place with its chat template: the adapter must
    hand it a copy, or re-encoding the same list would template it twice."""
    model = make(SPEC)
    prompts = list(PROMPTS)
    first = model._encode_batch(prompts)
    assert prompts == PROMPTS
    torch.testing.assert_close(model._encode_batch(prompts), first)


def test_timestep_is_one_minus_t():
    torch.testing.assert_close(zimage_timestep(torch.tensor([1.0, 0.25, 0.0])),
                               torch.tensor([0.0, 0.75, 1.0]))


def test_lora_targets_main_layers_and_refiners():
    from peft import LoraConfig

    model = make(SPEC)
    model.transformer.add_adapter(LoraConfig(r=2, target_modules=list(model.lora_target_modules)))
    wrapped = lora_modules_in(model.transformer)
    assert {"layers.0.attention.to_q", "noise_refiner.0.attention.to_out.0",
            "context_refiner.0.attention.to_k"} <= wrapped
    assert not any("feed_forward" in n for n in wrapped)


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_ode_parity_with_pipeline(guidance_scale):
    # Pipeline guidance_scale = ours - 1. Measured max |diff|: 0.0 at w = 1, 1.3e-6 at w = 5.
    assert check_ode_parity(SPEC, guidance_scale) < 2e-5


def test_cfg_runs_one_batch_with_both_halves_in_the_graph():
    check_cfg_one_batch(SPEC)


def test_decode_matches_pipeline():
    check_decode(SPEC, (3, 64, 64))


def test_lora_export_loads_into_pipeline(tmp_path, caplog):
    check_lora_roundtrip(SPEC, tmp_path, guidance_scale=5.0, caplog=caplog)


def test_gradient_checkpointing():
    check_gradient_checkpointing(SPEC)


def test_load_from_directory(tmp_path):
    check_load_directory(SPEC, tmp_path)


def test_tiny_recipe_trains_and_exports_a_loadable_lora(tmp_path, caplog):
    trainer = train_tiny_recipe(SPEC, tmp_path / "run")
    rows = read_rows(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    check_first_update_is_on_policy(rows)
    check_trained_lora(SPEC, trainer, tmp_path / "run", caplog)


def test_recipe_carries_the_anchor_settings_and_runs_with_a_tiny_model(tmp_path):
    from family_helpers import run_recipe_with_a_tiny_model
    from flowdppo.config import load_config, resolve
    from flowdppo.trainer.commands import RECIPES

    run = resolve(load_config(str(RECIPES / "zimage_dppo.yaml")))
    cfg = run.config
    assert (cfg.model.name, cfg.model.pretrained) == ("zimage", "Tongyi-MAI/Z-Image")
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.optim.lr) == (64, 128.0, 3e-4)
    assert (cfg.sampling.num_steps, cfg.sampling.guidance_scale) == (10, 5.0)  # pipeline g = 4
    assert (run.sde_steps.count, run.sde_steps.first, run.sde_steps.stop) == (1, 1, 4)  # steps 1-3
    run_recipe_with_a_tiny_model(SPEC, "zimage_dppo", tmp_path / "run")
