"""FLUX.1 adapter against diffusers' FluxPipeline (tiny random FLUX.1-dev layout, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowdppo.models import build_model
from flowdppo.models.diffusers_common import flux_timestep
from flowdppo.models.flux import FluxModel
from real_models_helpers import (
    PROMPTS,
    RES,
    TransformerCalls,
    adapter,
    check_decode,
    check_errors,
    check_gradient_checkpointing,
    check_load_directory,
    check_lora_roundtrip,
    check_ode_parity,
    check_peft_autocast,
    check_prompt_cache,
    check_sigmas_match_pipeline,
    noise_for,
    single_thread,  # noqa: F401 (autouse fixture)
)

FAMILY = "flux"


def test_registry_builds_tiny_random():
    model = build_model("flux", pretrained="tiny-random", dtype="fp32")
    assert isinstance(model, FluxModel)
    assert model.latent_shape == (16, RES // 8, RES // 8)  # unpacked at the boundary
    assert "single_transformer_blocks.0.proj_out" in model.lora_target_modules
    assert "proj_out" not in model.lora_target_modules  # would hit the final layer too


def test_timestep_helper_rounds_like_the_pipeline():
    t = torch.tensor([0.123456789, 1.0])
    torch.testing.assert_close(flux_timestep(t, torch.float32), t)
    # bf16: the pipeline rounds 1000 t to bf16 first (123.456 -> 123.5).
    assert flux_timestep(t, torch.bfloat16)[0] == torch.tensor(123.5, dtype=torch.bfloat16) / 1000


def test_sigmas_dynamic_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sigmas = check_sigmas_match_pipeline(FAMILY, FluxModel)
    # Exponential time shift of linspace(1, 1/K, K) with mu from the 4x4 = 16 image tokens.
    mu = calculate_shift(16, 256, 4096, 0.5, 1.15)
    s = np.linspace(1.0, 1.0 / 6, 6)
    expected = np.exp(mu) / (np.exp(mu) + (1 / s - 1))
    np.testing.assert_allclose(sigmas[:-1].numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.5])
def test_ode_parity_with_pipeline(guidance_scale):
    check_ode_parity(FAMILY, FluxModel, guidance_scale)


def test_guidance_is_embedded_not_a_cfg_batch():
    model = adapter(FluxModel, FAMILY)
    calls = TransformerCalls(model.transformer)
    noise = noise_for(model, 2)
    cond = model.encode_prompts(PROMPTS)
    t = torch.full((2,), 0.6)
    with torch.no_grad():
        v1 = model.predict_velocity(noise, t, cond, 1.0)
        v35 = model.predict_velocity(noise, t, cond, 3.5)
    assert calls.batches == [2, 2]
    assert torch.equal(calls.guidance[1], torch.full((2,), 3.5))
    assert (v35 - v1).abs().max() > 1e-3


def test_no_guidance_embedding_rejects_guidance():
    model = adapter(FluxModel, FAMILY)
    model._guidance_embeds = False  # as FLUX.1-schnell
    cond = model.encode_prompts(PROMPTS[:1])
    x = noise_for(model, 1)
    with pytest.raises(ValueError, match="no guidance embedding"):
        model.predict_velocity(x, torch.ones(1), cond, 3.5)


def test_decode_matches_pipeline():
    check_decode(FAMILY, FluxModel)


def test_lora_export_loads_into_pipeline(tmp_path):
    check_lora_roundtrip(FAMILY, FluxModel, tmp_path, guidance_scale=3.5)


def test_gradient_checkpointing():
    check_gradient_checkpointing(FAMILY, FluxModel)


def test_peft_and_autocast():
    check_peft_autocast(FAMILY, FluxModel)


def test_prompt_cache():
    check_prompt_cache(FAMILY, FluxModel)


def test_load_from_directory(tmp_path):
    check_load_directory(FAMILY, FluxModel, tmp_path)


def test_errors():
    check_errors(FAMILY, FluxModel)
