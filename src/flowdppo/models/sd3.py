"""Stable Diffusion 3 / 3.5 adapter (``StableDiffusion3Pipeline``, diffusers >= 0.36).

What follows the installed pipeline's ``__call__``:

1. Prompts: ``encode_prompt`` (CLIP-L + CLIP-G + T5); the negative is the empty prompt.
2. Timestep: the transformer takes the scheduler's 0-1000 value, ``1000 t``
   (:func:`sd3_timestep`).
3. CFG (``guidance_scale > 1``): [uncond, cond] in one batch,
   ``v = v_u + w (v_c - v_u)``; the pipeline's skip-layer guidance is not used.
4. Output: the transformer's prediction is ``eps - x0`` (``scheduler.step`` does
   ``x + (t' - t) v``), i.e. already our velocity.
5. Latents ``(16, H/8, W/8)`` (SD3.5); decode: ``z / scaling_factor + shift_factor``.
6. Grid: the scheduler's own static shift (3.0 for SD3.5), or ``mu`` from the image
   sequence length when the scheduler uses dynamic shifting.

Conditioning tensors: ``prompt_embeds`` (B, 77 + L, 4096) and ``pooled_prompt_embeds``
(B, 2048) for the real models.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import register_model
from .diffusers_common import DiffusersFlowModel


def sd3_timestep(t: Tensor) -> Tensor:
    """The SD3 transformer's timestep (0-1000) for times ``t`` in [0, 1]."""
    return t * 1000.0


@register_model("sd3")
class SD3Model(DiffusersFlowModel):
    """SD3/SD3.5 text-to-image flow model; arguments as :class:`DiffusersFlowModel`.

    LoRA targets the joint attention's image and text projections (the set Flow-GRPO trains
    for SD3.5). ``attn.*`` does not match SD3.5-Medium's second image-only attention
    (``attn2``).
    """

    family = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    default_max_sequence_length = 256
    default_num_steps = 28
    default_guidance_scale = 7.0
    lora_target_modules = (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    )

    @classmethod
    def _resolution_rule(cls, transformer_config: Any, vae_factor: int
                         ) -> tuple[int, int | None, str]:
        # Learned positions: at most pos_embed_max_size patches a side (diffusers otherwise
        # fails mid-forward with "Height cannot be greater than pos_embed_max_size").
        patch = int(transformer_config.get("patch_size", 2))
        positions = transformer_config.get("pos_embed_max_size")
        if not positions:
            return vae_factor * patch, None, ""
        largest = int(positions) * patch * vae_factor
        return (vae_factor * patch, largest,
                f"pos_embed_max_size {positions} x patch {patch} x VAE factor {vae_factor}")

    def _latent_shape(self, resolution: int) -> tuple[int, int, int]:
        side = resolution // self.pipe.vae_scale_factor
        return (self.pipe.transformer.config.in_channels, side, side)

    def _prepare_latents(self, batch: int, generator: torch.Generator | None) -> Tensor:
        channels, res = self.pipe.transformer.config.in_channels, self.resolution
        return self.pipe.prepare_latents(batch, channels, res, res, self._weight_dtype,
                                         self.device, generator)

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self._text_device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def _forward(self, x: Tensor, t: Tensor, tensors: dict[str, Tensor],
                 guidance_scale: float) -> Tensor:
        def run(x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
            return self.transformer(
                hidden_states=x,  # (B, C, H, W): SD3 patchifies inside
                timestep=sd3_timestep(t),
                encoder_hidden_states=cond["prompt_embeds"],
                pooled_projections=cond["pooled_prompt_embeds"],
                return_dict=False,
            )[0]

        return self._guided(run, x, t, tensors, guidance_scale, use_cfg=guidance_scale > 1.0)

    def _schedule_kwargs(self, num_steps: int) -> dict[str, Any]:
        config = self.pipe.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return {}  # static shift from the scheduler config
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
        )

        _, height, width = self.latent_shape
        patch = self.pipe.transformer.config.patch_size
        mu = calculate_shift(
            (height // patch) * (width // patch), config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
            config.get("max_shift", 1.16),
        )
        return {"mu": mu}
