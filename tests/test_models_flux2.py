"""FLUX.2-klein adapter against diffusers' Flux2KleinPipeline (tiny random base model, CPU)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from flowdppo.models import build_model
from flowdppo.models.flux2 import Flux2Model
from real_models_helpers import (
    PROMPTS,
    RES,
    TransformerCalls,
    adapter,
    check_cfg_graph,
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
    pipeline_latents,
    single_thread,  # noqa: F401 (autouse fixture)
)

FAMILY = "flux2"


def test_registry_builds_tiny_random():
    model = build_model("flux2", pretrained="tiny-random", dtype="fp32")
    assert isinstance(model, Flux2Model)
    # Patchified, normalised latents: 4 x 32 channels at 1/16 of the resolution.
    assert model.latent_shape == (128, RES // 16, RES // 16)
    assert model.text_encoder_out_layers == (9, 18, 27)
    cond = model.encode_prompts(PROMPTS)
    assert cond.tensors["prompt_embeds"].shape == (2, model.max_sequence_length, 3 * 16)


def test_sigmas_empirical_mu():
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    sigmas = check_sigmas_match_pipeline(FAMILY, Flux2Model, num_steps=6)
    mu = compute_empirical_mu(image_seq_len=16, num_steps=6)
    s = np.linspace(1.0, 1.0 / 6, 6)
    expected = np.exp(mu) / (np.exp(mu) + (1 / s - 1))
    np.testing.assert_allclose(sigmas[:-1].numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_ode_parity_with_pipeline(guidance_scale):
    check_ode_parity(FAMILY, Flux2Model, guidance_scale)


def test_distilled_model_ignores_guidance(caplog):
    model = adapter(Flux2Model, FAMILY)
    model.pipe.register_to_config(is_distilled=True)
    model = Flux2Model.from_pipeline(model.pipe, resolution=RES, max_sequence_length=32)
    calls = TransformerCalls(model.transformer)
    noise = noise_for(model, 2)
    with caplog.at_level(logging.WARNING, logger="flowdppo.models.flux2"):
        ours = model.predict_velocity(noise, torch.full((2,), 0.5),
                                      model.encode_prompts(PROMPTS), 4.0)
    assert calls.batches == [2] and "step-distilled" in caplog.text
    calls.remove()
    torch.testing.assert_close(  # and the pipeline agrees on the whole trajectory
        pipeline_latents(FAMILY, model.pipe, PROMPTS, noise, 2, 4.0),
        pipeline_latents(FAMILY, model.pipe, PROMPTS, noise, 2, 1.0))
    assert torch.isfinite(ours).all()


def test_cfg_keeps_both_halves_in_graph():
    check_cfg_graph(FAMILY, Flux2Model)


def test_decode_matches_pipeline():
    check_decode(FAMILY, Flux2Model)


def test_lora_export_loads_into_pipeline(tmp_path):
    check_lora_roundtrip(FAMILY, Flux2Model, tmp_path, guidance_scale=4.0)


def test_gradient_checkpointing():
    check_gradient_checkpointing(FAMILY, Flux2Model)


def test_peft_and_autocast():
    check_peft_autocast(FAMILY, Flux2Model)


def test_prompt_cache():
    check_prompt_cache(FAMILY, Flux2Model)


def test_load_from_directory(tmp_path):
    check_load_directory(FAMILY, Flux2Model, tmp_path)


def test_errors():
    check_errors(FAMILY, Flux2Model)
