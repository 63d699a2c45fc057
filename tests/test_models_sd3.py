"""SD3/SD3.5 adapter against diffusers' StableDiffusion3Pipeline (tiny random weights, CPU)."""

from __future__ import annotations

import pytest
import torch

from flowdppo.models import build_model
from flowdppo.models.sd3 import SD3Model, sd3_timestep
from real_models_helpers import (
    RES,
    SEQ,
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
    single_thread,  # noqa: F401 (autouse fixture)
    tiny_pipe,
)

FAMILY = "sd3"


def test_registry_builds_tiny_random():
    model = build_model("sd3", pretrained="tiny-random", dtype="fp32")
    assert isinstance(model, SD3Model)
    assert model.latent_shape == (16, RES // 8, RES // 8)
    assert model.max_sequence_length == SEQ
    assert set(model.lora_target_modules) >= {"attn.to_q", "attn.add_q_proj", "attn.to_add_out"}


def test_timestep_scale():
    torch.testing.assert_close(sd3_timestep(torch.tensor([0.0, 0.25, 1.0])),
                               torch.tensor([0.0, 250.0, 1000.0]))


def test_sigmas_static_shift():
    sigmas = check_sigmas_match_pipeline(FAMILY, SD3Model)
    # Static shift 3: sigma = 3 s / (1 + 2 s) over a linear grid s from 1 down to the
    # scheduler's smallest training sigma (itself shifted: 3e-3 / 1.002).
    s = torch.linspace(1.0, 3e-3 / 1.002, 6, dtype=torch.float64)
    torch.testing.assert_close(sigmas[:-1], 3 * s / (1 + 2 * s), atol=1e-6, rtol=0)


def test_sigmas_dynamic_shift_follow_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = adapter(SD3Model, FAMILY)
    model.pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sigmas = model.sigmas(5)
    model.pipe(prompt="a cat", height=RES, width=RES, num_inference_steps=5,
               guidance_scale=1.0, output_type="latent", max_sequence_length=SEQ)
    assert torch.equal(sigmas, model.pipe.scheduler.sigmas.to(torch.float64))
    assert not torch.allclose(sigmas, SD3Model.from_pipeline(tiny_pipe(FAMILY), resolution=RES)
                              .sigmas(5))  # mu differs from the static shift


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_ode_parity_with_pipeline(guidance_scale):
    check_ode_parity(FAMILY, SD3Model, guidance_scale)


def test_decode_matches_pipeline():
    check_decode(FAMILY, SD3Model)


def test_lora_export_loads_into_pipeline(tmp_path):
    check_lora_roundtrip(FAMILY, SD3Model, tmp_path, guidance_scale=3.0)


def test_lora_targets_skip_dual_attention():
    from peft import LoraConfig

    model = adapter(SD3Model, FAMILY)
    model.transformer.add_adapter(LoraConfig(r=2, target_modules=list(model.lora_target_modules)))
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in model.transformer.named_parameters()
               if ".lora_A" in n}
    assert "transformer_blocks.0.attn.to_q" in wrapped
    assert "transformer_blocks.0.attn.to_add_out" in wrapped  # the last block has none
    assert "transformer_blocks.1.attn.add_q_proj" in wrapped
    assert not any("attn2" in n for n in wrapped)


def test_cfg_keeps_both_halves_in_graph():
    check_cfg_graph(FAMILY, SD3Model)


def test_gradient_checkpointing():
    check_gradient_checkpointing(FAMILY, SD3Model)


def test_peft_and_autocast():
    check_peft_autocast(FAMILY, SD3Model)


def test_prompt_cache():
    check_prompt_cache(FAMILY, SD3Model)


def test_load_from_directory(tmp_path):
    check_load_directory(FAMILY, SD3Model, tmp_path)


def test_errors():
    check_errors(FAMILY, SD3Model)


def test_from_pipeline_uses_given_components():
    pipe = tiny_pipe(FAMILY)
    model = SD3Model.from_pipeline(pipe, resolution=128)
    assert model.transformer is pipe.transformer and model.latent_shape == (16, 16, 16)
    assert not any(p.requires_grad for p in pipe.text_encoder_3.parameters())


def test_hub_id_loads_offline_from_the_cache(tmp_path, monkeypatch):
    """A hub id resolves from a (fake) Hugging Face cache, with no network: HF_HUB_OFFLINE is
    set and downloads are off; text encoders may live on another device."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "models--flowdppo-test--tiny-sd3"
    tiny_pipe(FAMILY).save_pretrained(repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    model = SD3Model("flowdppo-test/tiny-sd3", cache_dir=str(tmp_path), dtype="fp32",
                     resolution=RES, max_sequence_length=SEQ, text_encoder_device="cpu")
    assert model.latent_shape == (16, RES // 8, RES // 8)
    reference = adapter(SD3Model, FAMILY)
    torch.testing.assert_close(model.encode_prompts(["a cat"]).tensors["prompt_embeds"],
                               reference.encode_prompts(["a cat"]).tensors["prompt_embeds"])
