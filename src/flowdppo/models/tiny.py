"""Tiny random diffusers pipelines (SD3.5, FLUX.1-dev, FLUX.2-klein) built in-process.

Same classes and wiring as the real checkpoints, random weights, a few thousand
parameters per component, so every adapter code path runs on a CPU in milliseconds. The
tokenizers are built offline from a byte-level alphabet (CLIP, Qwen2) or a character
Unigram vocabulary (T5): nothing is read from the hub. Construction is deterministic in
``seed`` (each component is seeded on its own, the global RNG is left untouched).

The VAEs keep the real 8x compression (four blocks), and the latent channel counts are the
real ones (16 for SD3/FLUX.1, 32 for FLUX.2), so latent shapes match the full models at
the same resolution; default resolution for the tiny models is 64 px.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any

import torch

FAMILIES = ("sd3", "flux", "flux2")
TINY_RESOLUTION = 64
TINY_MAX_SEQUENCE_LENGTH = 32
_CLIP_LENGTH = 77  # CLIP's model_max_length, as in the real models
_QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)


def _seeded(seed: int, build: Callable[[], Any]) -> Any:
    """``build()`` under ``torch.manual_seed(seed)`` without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def clip_tokenizer():
    """Byte-level BPE with no merges: every byte is a token (plus its end-of-word form)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in _byte_alphabet():
            vocab[char + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=_CLIP_LENGTH)


def t5_tokenizer():
    """Unigram over single characters (and space-prefixed letters), T5's special ids 0-2."""
    from transformers import T5TokenizerFast

    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in chars] + [("▁" + c, -2.5) for c in string.ascii_lowercase]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def qwen_tokenizer():
    """Byte-level BPE with Qwen's chat special tokens and a Qwen3-style chat template."""
    from transformers import Qwen2TokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    vocab = {c: i for i, c in enumerate(_byte_alphabet())}
    vocab.update({s: len(vocab) + i for i, s in enumerate(specials)})
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=[], model_max_length=512)
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    tokenizer.chat_template = _QWEN_CHAT_TEMPLATE
    return tokenizer


def _clip_encoder(seed: int, vocab_size: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, projection_dim=16, max_position_embeddings=_CLIP_LENGTH,
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu",
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return _seeded(seed, lambda: cls(config).eval())


def _t5_encoder(seed: int, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=32, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0)
    return _seeded(seed, lambda: T5EncoderModel(config).eval())


def _vae_kwargs(latent_channels: int) -> dict[str, Any]:
    """Four 8-channel blocks: the real 8x spatial compression at negligible cost."""
    return dict(
        in_channels=3, out_channels=3, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=TINY_RESOLUTION,
    )


def _sd3(seed: int):
    """SD3.5-Medium layout: qk RMS-norm, one dual-attention block, CLIP-L/G + T5 encoders."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    clip, t5 = clip_tokenizer(), t5_tokenizer()
    transformer = _seeded(seed, lambda: SD3Transformer2DModel(
        sample_size=TINY_RESOLUTION // 8, patch_size=2, in_channels=16, out_channels=16,
        num_layers=2, attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
        caption_projection_dim=32, pooled_projection_dim=32, pos_embed_max_size=16,
        dual_attention_layers=(0,), qk_norm="rms_norm"))
    vae = _seeded(seed + 1, lambda: AutoencoderKL(
        **_vae_kwargs(16), scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=_clip_encoder(seed + 2, len(clip), True), tokenizer=clip,
        text_encoder_2=_clip_encoder(seed + 3, len(clip), True), tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5_encoder(seed + 4, len(t5)), tokenizer_3=t5,
    )


def _flux(seed: int):
    """FLUX.1-dev layout: guidance embedding, CLIP pooled + T5 sequence conditioning."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )

    clip, t5 = clip_tokenizer(), t5_tokenizer()
    transformer = _seeded(seed, lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6)))
    vae = _seeded(seed + 1, lambda: AutoencoderKL(
        **_vae_kwargs(16), scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False))
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=_clip_encoder(seed + 2, len(clip), False),
        tokenizer=clip, text_encoder_2=_t5_encoder(seed + 3, len(t5)), tokenizer_2=t5,
        transformer=transformer,
    )


def _flux2(seed: int):
    """FLUX.2-klein base layout: Qwen3 hidden states of layers (9, 18, 27), true CFG."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = qwen_tokenizer()
    # 28 layers (of width 16) so the pipeline's default layers (9, 18, 27) exist.
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=16,
                         num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=2,
                         head_dim=8, max_position_embeddings=512)
    transformer = _seeded(seed, lambda: Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=48, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False))

    def vae():
        model = AutoencoderKLFlux2(**_vae_kwargs(32), use_quant_conv=False,
                                   use_post_quant_conv=False)
        # Non-trivial latent statistics so decode's de-normalisation is exercised.
        model.bn.running_mean.normal_(0.0, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        return model.eval()

    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")
    return Flux2KleinPipeline(
        scheduler=scheduler, vae=_seeded(seed + 1, vae), tokenizer=tokenizer,
        text_encoder=_seeded(seed + 2, lambda: Qwen3ForCausalLM(config).eval()),
        transformer=transformer, is_distilled=False,
    )


_BUILDERS = {"sd3": _sd3, "flux": _flux, "flux2": _flux2}


def build_tiny_pipeline(family: str, seed: int = 0):
    """A tiny random pipeline of ``family`` (sd3, flux, flux2, qwenimage, zimage, wan), float32.

    Args:
        family (`str`): model family.
        seed (`int`, defaults to 0): the same seed gives the same weights.

    Returns:
        `StableDiffusion3Pipeline`, `FluxPipeline` or `Flux2KleinPipeline`.
    """
    from .tiny_extra import BUILDERS as more  # Qwen-Image, Z-Image, Wan

    builders = {**_BUILDERS, **more}
    if family not in builders:
        raise ValueError(f"unknown tiny family {family!r}: expected one of {sorted(builders)}")
    pipe = builders[family](seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe
