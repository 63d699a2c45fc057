"""Tiny random Qwen-Image, Z-Image and Wan 2.1 pipelines built in-process (see :mod:`.tiny`).

Same classes and wiring as the released checkpoints (diffusers 0.42), random weights, offline
tokenizers. What is kept real because the adapters depend on it:

- Qwen-Image: the VAE's 8x compression and 16 latent channels with non-trivial
  ``latents_mean`` / ``latents_std``; the released scheduler config (dynamic exponential
  shift, ``shift_terminal`` 0.02); a tokenizer that splits the pipeline's system prefix into
  exactly the 34 tokens the pipeline drops (else the prefix would leak into the embedding).
- Z-Image: the FLUX VAE normalisation; Qwen3 hidden states; the Turbo scheduler (shift 3).
- Wan: the 3-D VAE's 4x temporal and 8x spatial compression, (1, 2, 2) patches, UMT5, and
  the UniPC scheduler the 2.1 checkpoints ship (``flow_shift`` 3).
"""

from __future__ import annotations

from typing import Any

from .tiny import _seeded, _vae_kwargs, qwen_tokenizer, t5_tokenizer

FAMILIES = ("qwenimage", "zimage", "wan")
WAN_TINY_FRAMES = 5  # 4k + 1: two latent frames
WAN_TINY_RESOLUTION = 32
# Multi-character pieces of QwenImagePipeline's system prompt, as Qwen's BPE splits them.
_QWEN_PREFIX_WORDS = (
    "system", "Describe", " the", " image", " by", " detailing", " color", " shape", " size",
    " texture", " quantity", " text", " spatial", " relationships", " of", " objects", " and",
    " background", "user",
)


def qwenimage_tokenizer():
    """:func:`qwen_tokenizer` plus added tokens for the system prefix (34 tokens, as Qwen's)."""
    from tokenizers import AddedToken

    tokenizer = qwen_tokenizer()
    tokenizer.add_tokens([AddedToken(w, normalized=False) for w in _QWEN_PREFIX_WORDS])
    return tokenizer


def _latent_stats(seed: int, channels: int = 16) -> dict[str, list[float]]:
    """Non-trivial per-channel latent statistics, so decode's de-normalisation is exercised."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    mean = (torch.randn(channels, generator=gen) * 0.5).tolist()
    std = (torch.rand(channels, generator=gen) * 1.5 + 0.5).tolist()
    return {"latents_mean": mean, "latents_std": std}


def _qwen25_vl(seed: int, tokenizer: Any):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vocab_size = len(tokenizer)
    special = {"bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
               "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>")}
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": vocab_size + 3, "hidden_size": 16, "intermediate_size": 16,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                     "max_position_embeddings": 2048, **special,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                         "mrope_section": [1, 1, 2]}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": 16},
        # Vision ids past the text vocabulary: never produced by the tokenizer.
        vision_start_token_id=vocab_size, vision_end_token_id=vocab_size + 1,
        image_token_id=vocab_size + 2, video_token_id=vocab_size + 2,
    )
    return _seeded(seed, lambda: Qwen2_5_VLForConditionalGeneration(config).eval())


def _qwenimage(seed: int):
    """Qwen-Image layout: MMDiT on packed 2x2 patches, Qwen2.5-VL last hidden state."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    tokenizer = qwenimage_tokenizer()
    transformer = _seeded(seed, lambda: QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False,
        axes_dims_rope=(4, 6, 6)))
    vae = _seeded(seed + 1, lambda: AutoencoderKLQwenImage(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], **_latent_stats(seed + 5)).eval())
    scheduler = FlowMatchEulerDiscreteScheduler(  # Qwen/Qwen-Image scheduler_config.json
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
        shift=1.0, shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)
    return QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=_qwen25_vl(seed + 2, tokenizer),
        tokenizer=tokenizer, transformer=transformer)


def _zimage(seed: int):
    """Z-Image layout: single-stream DiT with refiners, Qwen3 second-to-last hidden state."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = qwen_tokenizer()
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         head_dim=8, max_position_embeddings=512)
    transformer = _seeded(seed, lambda: ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6],
        axes_lens=[512, 32, 32]))
    # The pad tokens start at zero; random ones make the padding paths visible.
    _seeded(seed + 9, lambda: [p.data.normal_() for p in (transformer.x_pad_token,
                                                          transformer.cap_pad_token)])
    vae = _seeded(seed + 1, lambda: AutoencoderKL(
        **_vae_kwargs(16), scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False))
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=_seeded(seed + 2, lambda: Qwen3Model(config).eval()), tokenizer=tokenizer,
        transformer=transformer)


def _wan(seed: int):
    """Wan 2.1 text-to-video layout: 3-D VAE, UMT5 encoder, UniPC scheduler (flow_shift 3)."""
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = t5_tokenizer()
    config = UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=32, num_layers=2,
                        num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0)
    transformer = _seeded(seed, lambda: WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=16,
        out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32))
    vae = _seeded(seed + 1, lambda: AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], **_latent_stats(seed + 5)).eval())
    scheduler = UniPCMultistepScheduler(  # Wan-AI/Wan2.1-T2V-*-Diffusers scheduler config
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
        num_train_timesteps=1000)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=_seeded(seed + 2, lambda: UMT5EncoderModel(config).eval()),
        vae=vae, scheduler=scheduler, transformer=transformer)


BUILDERS: dict[str, Any] = {"qwenimage": _qwenimage, "zimage": _zimage, "wan": _wan}
