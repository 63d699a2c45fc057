"""Full-size Qwen-Image and Wan 2.1 14B transformers for bench/throughput.py (random weights).

The transformer configs are the published ``transformer/config.json`` of Qwen/Qwen-Image and
Wan-AI/Wan2.1-T2V-14B-Diffusers. The bench model is the flowdppo adapter itself (its packing,
timestep and CFG code) around a pipeline whose transformer is the full-size one and whose
other components are the tiny random ones (never run: prompts are random embeddings of the
transformer's text width, and the benchmark never decodes). Nothing is downloaded.
``tiny_qwenimage`` / ``tiny_wan`` are the same code paths at toy size, for CPU checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from flowdppo.models import Conditioning, FlowModel
from flowdppo.models.qwenimage import QwenImageModel
from flowdppo.models.tiny import build_tiny_pipeline
from flowdppo.models.wan import WanModel


@dataclass(frozen=True)
class FamilyPreset:
    """A family's transformer config (diffusers kwargs), the adapter options and bench defaults."""

    family: str  # "qwenimage" or "wan"
    config: dict[str, Any]
    batch: int
    resolution: int
    text_tokens: int
    lora_rank: int
    options: dict[str, Any] = field(default_factory=dict)


_QWEN_TINY = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                  guidance_embeds=False, axes_dims_rope=(4, 6, 6))
_WAN_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=16,
                 out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2,
                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)

FAMILY_PRESETS = {
    # Qwen/Qwen-Image transformer/config.json (20.4B parameters); 512 px, batch 4 and LoRA r64
    # as Flow-GRPO's / Flow-Factory's Qwen-Image recipes; 128 text tokens (a long prompt).
    "qwenimage": FamilyPreset("qwenimage", dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
        axes_dims_rope=(16, 56, 56)), 4, 512, 128, 64),
    # Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json (14.3B parameters); Flow-GRPO's
    # 240 x 416 px x 33 frames (latent (16, 9, 30, 52): 3510 tokens), UMT5's 512 tokens.
    "wan14b": FamilyPreset("wan", dict(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
        2, 240, 512, 64, {"height": 240, "width": 416, "num_frames": 33}),
    "tiny_qwenimage": FamilyPreset("qwenimage", _QWEN_TINY, 2, 64, 8, 4),
    "tiny_wan": FamilyPreset("wan", _WAN_TINY, 2, 32, 8, 4, {"num_frames": 5}),
}


class _RandomPrompts:
    """Random prompt embeddings of the transformer's text width; no decode."""

    text_tokens: int
    text_dim: int

    def encode_prompts(self, prompts) -> Conditioning:
        gen = torch.Generator().manual_seed(len(prompts))
        shape = (len(prompts), self.text_tokens)
        embeds = torch.randn(*shape, self.text_dim, generator=gen)
        tensors = {"prompt_embeds": embeds.to(self.device, self._weight_dtype)}
        if self.family == "qwenimage":
            tensors["prompt_embeds_mask"] = torch.ones(shape, device=self.device)
        return Conditioning(tensors)

    def decode(self, latents):
        raise NotImplementedError("the benchmark has no VAE")


class QwenImageBench(_RandomPrompts, QwenImageModel):
    pass


class WanBench(_RandomPrompts, WanModel):
    pass


def build_transformer(preset: FamilyPreset, device: torch.device, dtype: torch.dtype):
    """The random-weights transformer, built directly in ``dtype`` on ``device``."""
    from diffusers import QwenImageTransformer2DModel, WanTransformer3DModel

    cls = QwenImageTransformer2DModel if preset.family == "qwenimage" else WanTransformer3DModel
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # a 20B model in fp32 would not fit
    try:
        with torch.device(device):
            return cls(**preset.config).eval()
    finally:
        torch.set_default_dtype(previous)


def build_family_model(preset: FamilyPreset, resolution: int, text_tokens: int,
                       device: torch.device, dtype: torch.dtype) -> FlowModel:
    """The adapter of ``preset.family`` around the full-size random transformer."""
    pipe = build_tiny_pipeline(preset.family)  # tiny text encoder / VAE, left on the CPU
    pipe.register_modules(transformer=build_transformer(preset, device, dtype))
    options = dict(preset.options)
    if preset.family == "wan" and resolution != preset.resolution:
        options.update(height=resolution, width=resolution)  # --resolution: square video
    cls = QwenImageBench if preset.family == "qwenimage" else WanBench
    model = cls.from_pipeline(pipe, resolution=resolution, max_sequence_length=text_tokens,
                              **options)
    model.text_tokens = text_tokens
    model.text_dim = preset.config.get("joint_attention_dim") or preset.config["text_dim"]
    return model
