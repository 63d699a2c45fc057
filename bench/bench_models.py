"""Model setup for the benchmarks: random-weights diffusers transformers behind the adapter
interface, built from published configs (no downloads), with the trainer's own LoRA.

``PRESETS`` maps a name to a :class:`Preset`; ``FAMILIES`` maps a preset's ``family`` to how
its transformer is built and called. Both are plain dicts: more specs (other model sizes or
families) are passed to :func:`presets_with` / :func:`build_bench_model` as a dict, or added
to these dicts, without editing the measurement code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flowdppo.config import LoraConfig
from flowdppo.models import Conditioning, FlowModel
from flowdppo.trainer.policy import apply_trainable

# LoRA targets: the attention projections (flow_grpo's SD3.5 set; FLUX blocks share the names).
ATTENTION_PROJECTIONS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                         "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                         "attn.to_add_out")


@dataclass(frozen=True)
class Preset:
    """A transformer family's config (diffusers kwargs) and the benchmark defaults."""

    family: str  # a key of FAMILIES ("sd3", "flux", or one added there)
    config: dict[str, Any]
    batch: int
    resolution: int
    text_tokens: int
    lora_rank: int


PRESETS: dict[str, Preset] = {
    # stabilityai/stable-diffusion-3.5-medium transformer/config.json (2.5B parameters).
    "sd35m": Preset("sd3", dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
        caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"), 16, 512, 333, 32),
    # black-forest-labs/FLUX.1-dev transformer/config.json (12B parameters); paper: LoRA r64.
    "flux1": Preset("flux", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
        guidance_embeds=True, axes_dims_rope=(16, 56, 56)), 16, 512, 512, 64),
    # The SD3.5-M code paths (dual attention, RMS qk-norm) at toy size, for CPU checks.
    "tiny": Preset("sd3", dict(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        caption_projection_dim=32, pooled_projection_dim=16, pos_embed_max_size=16,
        dual_attention_layers=(0,), qk_norm="rms_norm"), 4, 64, 8, 4),
}


def presets_with(extra: Mapping[str, Preset] | None = None) -> dict[str, Preset]:
    """The built-in presets plus ``extra`` (a name in both is an error, not a silent override)."""
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(PRESETS))
    if clash:
        raise ValueError(f"extra model specs {clash} reuse built-in preset names; rename them")
    return {**PRESETS, **extra}


@dataclass(frozen=True)
class Family:
    """How one diffusers transformer class is built and called.

    ``latent_shape(config, side)``: one sample's latent shape for a VAE latent of ``side``;
    ``velocity(model, x_t, t, cond)``: the transformer's output for ``t`` in [0, 1];
    ``constants(model)``: tensors built once per model (e.g. FLUX's position ids).
    """

    transformer_class: str  # attribute of the diffusers package
    latent_shape: Callable[[dict[str, Any], int], tuple[int, ...]]
    velocity: Callable[[BenchModel, Tensor, Tensor, Conditioning], Tensor]
    constants: Callable[[BenchModel], dict[str, Tensor]] | None = None


def _embeds(cond: Conditioning) -> dict[str, Tensor]:
    return {"encoder_hidden_states": cond.tensors["prompt_embeds"],
            "pooled_projections": cond.tensors["pooled_prompt_embeds"]}


def _sd3_velocity(model: BenchModel, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    return model.transformer(hidden_states=x_t, timestep=t * 1000.0, return_dict=False,
                             **_embeds(cond))[0]


def _flux_velocity(model: BenchModel, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    guidance = torch.full_like(t, 3.5)  # FLUX.1-dev is guidance-distilled
    return model.transformer(hidden_states=x_t, timestep=t, guidance=guidance,
                             img_ids=model.constants["img_ids"], txt_ids=model.constants["txt_ids"],
                             return_dict=False, **_embeds(cond))[0]


def _flux_ids(model: BenchModel) -> dict[str, Tensor]:
    """Position ids of the packed 2x2 latent patches and of the text tokens."""
    side = math.isqrt(model.latent_shape[0])
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return {"img_ids": ids.to(model.device, model.dtype),
            "txt_ids": torch.zeros(model.text_tokens, 3, device=model.device, dtype=model.dtype)}


FAMILIES: dict[str, Family] = {
    "sd3": Family("SD3Transformer2DModel", lambda c, side: (c["in_channels"], side, side),
                  _sd3_velocity),
    # FLUX packs 2x2 latent patches: (tokens, 16 * 4).
    "flux": Family("FluxTransformer2DModel", lambda c, side: ((side // 2) ** 2, c["in_channels"]),
                   _flux_velocity, _flux_ids),
}


class BenchModel(FlowModel):
    """A random-weights transformer behind the adapter interface, random prompt embeddings."""

    def __init__(self, preset: Preset, resolution: int, text_tokens: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        import diffusers

        if resolution % 16:
            raise ValueError(f"--resolution {resolution}: must be a multiple of 16 (VAE 8 x patch 2)")
        if preset.family not in FAMILIES:
            raise ValueError(f"model family {preset.family!r}: unknown; expected one of "
                             f"{sorted(FAMILIES)} (add it to bench_models.FAMILIES)")
        self.family = FAMILIES[preset.family]
        self.text_tokens = text_tokens
        cls = getattr(diffusers, self.family.transformer_class)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # build in the final dtype: FLUX in fp32 would not fit
        try:
            with torch.device(device):
                self.transformer = cls(**preset.config).eval()
        finally:
            torch.set_default_dtype(previous)
        self.lora_target_modules = ATTENTION_PROJECTIONS
        self.text_dim = preset.config["joint_attention_dim"]
        self.pooled_dim = preset.config.get("pooled_projection_dim")
        self.latent_shape = self.family.latent_shape(preset.config, resolution // 8)
        self.constants = self.family.constants(self) if self.family.constants else {}

    def encode_prompts(self, prompts) -> Conditioning:
        gen = torch.Generator().manual_seed(len(prompts))
        embeds = torch.randn(len(prompts), self.text_tokens, self.text_dim, generator=gen)
        tensors = {"prompt_embeds": embeds.to(self.device, self.dtype)}
        if self.pooled_dim is not None:
            pooled = torch.randn(len(prompts), self.pooled_dim, generator=gen)
            tensors["pooled_prompt_embeds"] = pooled.to(self.device, self.dtype)
        return Conditioning(tensors)

    def predict_velocity(self, x_t: Tensor, t: Tensor, cond: Conditioning,
                         guidance_scale: float = 1.0) -> Tensor:
        return self.family.velocity(self, x_t.to(self.dtype), t, cond).float()

    def decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError("the benchmark has no VAE")

    def sigmas(self, num_steps: int) -> Tensor:
        s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
        return 3.0 * s / (1.0 + 2.0 * s)  # SD3 time shift 3


def build_bench_model(preset: Preset, resolution: int, text_tokens: int, device: torch.device,
                      dtype: torch.dtype, lora: LoraConfig, seed: int = 0) -> BenchModel:
    """The model with LoRA injected by the trainer's ``apply_trainable`` (adapter in fp32)."""
    torch.manual_seed(seed)
    model = BenchModel(preset, resolution, text_tokens, device, dtype)
    apply_trainable(model, lora, seed=seed)
    return model
