"""Qwen-Image adapter against diffusers' QwenImagePipeline (tiny random weights, CPU)."""

from __future__ import annotations

import numpy as np
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
from flowdppo.models.qwenimage import QwenImageModel, qwen_cfg
from real_models_helpers import PROMPTS, SEQ, single_thread  # noqa: F401 (autouse fixture)

SPEC = Spec("qwenimage", QwenImageModel, negative=" ")


def test_registry_builds_tiny_random():
    model = build_model("qwenimage", pretrained="tiny-random", dtype="fp32")
    assert isinstance(model, QwenImageModel) and model.negative_prompt == " "
    assert model.latent_shape == (16, 8, 8) and model.max_sequence_length == SEQ
    cond = model.encode_prompts(PROMPTS)
    assert cond.tensors["prompt_embeds"].shape == (2, SEQ, 16)
    lengths = cond.tensors["prompt_embeds_mask"].sum(1)
    assert lengths[0] < lengths[1]  # "a red cat" is shorter: padded, masked


def test_tiny_tokenizer_splits_the_system_prefix_as_qwen_does():
    """The pipeline drops a fixed 34 tokens: the tiny tokenizer must split the system prefix
    into exactly that many, or the prefix leaks into the prompt embedding."""
    pipe = make(SPEC).pipe
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34


def test_lora_targets_every_block_attention():
    from peft import LoraConfig

    model = make(SPEC)
    model.transformer.add_adapter(LoraConfig(r=2, target_modules=list(model.lora_target_modules)))
    wrapped = lora_modules_in(model.transformer)
    blocks = len(model.transformer.transformer_blocks)
    assert len(wrapped) == 8 * blocks and "transformer_blocks.1.attn.to_add_out" in wrapped


def test_sigmas_dynamic_exponential_shift_with_terminal_stretch():
    model = make(SPEC)
    sigmas = model.sigmas(6)
    cfg = model.pipe.scheduler.config
    mu = 0.5 + (0.9 - 0.5) / (8192 - 256) * (16 - 256)  # calculate_shift(16 tokens)
    s = np.linspace(1.0, 1.0 / 6, 6)
    shifted = np.exp(mu) / (np.exp(mu) + (1 / s - 1))
    one_minus = 1 - shifted
    stretched = 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))
    np.testing.assert_allclose(sigmas[:-1].numpy(), stretched, atol=1e-6)
    assert float(sigmas[-2]) == pytest.approx(0.02) and float(sigmas[-1]) == 0.0
    with pytest.raises(ValueError, match="at least 2 sampling steps"):
        model.sigmas(1)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_ode_parity_with_pipeline(guidance_scale):
    # Measured max |ours - pipeline|: 0.0 at w = 1, 1.2e-6 at w = 4 (true CFG, padded masks).
    assert check_ode_parity(SPEC, guidance_scale) < 2e-5


def test_true_cfg_keeps_the_conditional_norm_per_token():
    gen = torch.Generator().manual_seed(0)
    v_neg, v_cond = torch.randn(2, 1, 5, 64, generator=gen)
    out = qwen_cfg(v_neg, v_cond, 4.0)
    torch.testing.assert_close(out.norm(dim=-1), v_cond.norm(dim=-1))
    direction = v_neg + 4.0 * (v_cond - v_neg)
    torch.testing.assert_close(torch.cosine_similarity(out, direction, dim=-1), torch.ones(1, 5))


def test_cfg_runs_one_batch_with_both_halves_in_the_graph():
    check_cfg_one_batch(SPEC)


def test_decode_matches_pipeline():
    check_decode(SPEC, (3, 64, 64))


def test_lora_export_loads_into_pipeline(tmp_path, caplog):
    check_lora_roundtrip(SPEC, tmp_path, guidance_scale=4.0, caplog=caplog)


def test_gradient_checkpointing():
    check_gradient_checkpointing(SPEC)


def test_load_from_directory(tmp_path):
    check_load_directory(SPEC, tmp_path)


def test_tiny_recipe_trains_and_exports_a_loadable_lora(tmp_path, caplog):
    trainer = train_tiny_recipe(SPEC, tmp_path / "run")
    rows = read_rows(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    check_first_update_is_on_policy(rows)
    (evaluation,) = read_rows(tmp_path / "run" / "eval.jsonl")
    assert evaluation["kl_ref"] > 0
    check_trained_lora(SPEC, trainer, tmp_path / "run", caplog)


def test_errors():
    with pytest.raises(ValueError, match="negative_prompt"):
        QwenImageModel.from_pipeline(make(SPEC).pipe, resolution=64, negative_prompt=None)
    with pytest.raises(ValueError, match=r"resolution`=40: qwenimage needs a positive multiple of 16"):
        QwenImageModel.from_pipeline(make(SPEC).pipe, resolution=40)


def test_recipe_carries_the_anchor_settings_and_runs_with_a_tiny_model(tmp_path):
    from family_helpers import run_recipe_with_a_tiny_model
    from flowdppo.config import load_config, resolve
    from flowdppo.trainer.commands import RECIPES

    run = resolve(load_config(str(RECIPES / "qwenimage_dppo.yaml")))
    cfg = run.config
    assert (cfg.model.name, cfg.model.pretrained) == ("qwenimage", "Qwen/Qwen-Image")
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.optim.lr) == (64, 128.0, 3e-4)
    assert (cfg.sampling.num_steps, cfg.sampling.guidance_scale, cfg.sampling.group_size) == \
        (10, 4.0, 16)
    assert (run.sde_steps.count, run.sde_steps.first, run.sde_steps.stop) == (2, 0, 5)
    assert cfg.model.gradient_checkpointing and run.hparams.threshold == 1e-7
    trainer = run_recipe_with_a_tiny_model(SPEC, "qwenimage_dppo", tmp_path / "run")
    assert trainer.model.negative_prompt == " "
