"""FLUX.1 adapter (``FluxPipeline``: FLUX.1-dev, and FLUX.1-schnell at guidance 1).

What follows the installed pipeline's ``__call__``:

1. Prompts: ``encode_prompt`` gives the T5 sequence (``prompt_embeds``, (B, L, 4096))
   and the CLIP pooled vector (``pooled_prompt_embeds``, (B, 768)).
2. Latents stay unpacked at the adapter boundary, ``(16, H/8, W/8)``; the 2x2 packing into
   ``(H/16 * W/16, 64)`` tokens, the image position ids ``(0, row, col)`` and the zero text
   ids happen inside :meth:`FluxModel._forward` with the pipeline's own static helpers.
3. Timestep: the transformer takes ``t`` in [0, 1] (see :func:`flux_timestep`).
4. Guidance: FLUX.1-dev is guidance-distilled: ``guidance_scale`` goes into the guidance
   embedding (the pipeline's default is 3.5) and there is NO CFG batch. The pipeline's
   optional "true CFG" with a negative prompt is not used.
5. Output ``eps - x0`` (the pipeline feeds it to ``scheduler.step``), unpacked.
6. Grid: ``sigmas = linspace(1, 1/K, K)`` shifted with ``mu = calculate_shift(seq_len)``
   (dynamic shifting from the number of image tokens), terminal 0 appended.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .base import register_model
from .diffusers_common import DiffusersFlowModel, flux_timestep

_ATTENTION = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)


def flux_schedule_sigmas(scheduler_config: Any, num_steps: int) -> np.ndarray | None:
    """The pipelines' input sigmas ``linspace(1, 1/K, K)`` (None with ``use_flow_sigmas``)."""
    if scheduler_config.get("use_flow_sigmas", False):
        return None
    return np.linspace(1.0, 1.0 / num_steps, num_steps)


@register_model("flux")
class FluxModel(DiffusersFlowModel):
    """FLUX.1 text-to-image flow model; arguments as :class:`DiffusersFlowModel`.

    LoRA targets every attention projection (double blocks: image and text; single blocks:
    q/k/v) plus the single blocks' MLP input ``proj_mlp`` and fused output ``proj_out``
    (named per block: a bare ``proj_out`` would also hit the final output layer).
    """

    family = "flux"
    pipeline_class_name = "FluxPipeline"
    default_max_sequence_length = 512
    default_num_steps = 28
    default_guidance_scale = 3.5

    def _init_family(self, **options: Any) -> None:
        super()._init_family(**options)
        config = self.pipe.transformer.config
        self._guidance_embeds = bool(config.guidance_embeds)
        singles = tuple(f"single_transformer_blocks.{i}.proj_out"
                        for i in range(config.num_single_layers))
        self.lora_target_modules = (*_ATTENTION, "proj_mlp", *singles)

    def _latent_shape(self, resolution: int) -> tuple[int, int, int]:
        side = resolution // self.pipe.vae_scale_factor  # a multiple of 2: 2x2 packing
        return (self.pipe.transformer.config.in_channels // 4, side, side)

    def _prepare_latents(self, batch: int, generator: torch.Generator | None) -> Tensor:
        from diffusers import FluxPipeline

        channels, res = self.latent_shape[0], self.resolution
        packed, _ = self.pipe.prepare_latents(batch, channels, res, res, self._weight_dtype,
                                              self.device, generator)  # (B, HW/4, 4C)
        return FluxPipeline._unpack_latents(packed, res, res, self.pipe.vae_scale_factor)

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self._text_device,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def _guidance(self, batch: int, guidance_scale: float, device: torch.device) -> Tensor | None:
        if self._guidance_embeds:
            return torch.full((batch,), guidance_scale, device=device, dtype=torch.float32)
        if guidance_scale != 1.0:
            raise ValueError(f"guidance_scale={guidance_scale}: this FLUX transformer has no "
                             "guidance embedding (schnell); use guidance_scale=1.0")
        return None

    def _forward(self, x: Tensor, t: Tensor, tensors: dict[str, Tensor],
                 guidance_scale: float) -> Tensor:
        from diffusers import FluxPipeline

        batch, channels, height, width = x.shape
        embeds = tensors["prompt_embeds"]
        packed = FluxPipeline._pack_latents(x, batch, channels, height, width)  # (B, HW/4, 4C)
        img_ids = FluxPipeline._prepare_latent_image_ids(
            batch, height // 2, width // 2, x.device, x.dtype)  # (HW/4, 3)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=x.dtype)
        out = self.transformer(
            hidden_states=packed,
            timestep=flux_timestep(t, x.dtype),
            guidance=self._guidance(batch, guidance_scale, x.device),
            pooled_projections=tensors["pooled_prompt_embeds"],
            encoder_hidden_states=embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        factor = self.pipe.vae_scale_factor
        return FluxPipeline._unpack_latents(out, height * factor, width * factor, factor)

    def _schedule_kwargs(self, num_steps: int) -> dict[str, Any]:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = self.pipe.scheduler.config
        _, height, width = self.latent_shape
        mu = calculate_shift(
            (height // 2) * (width // 2), config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return {"sigmas": flux_schedule_sigmas(config, num_steps), "mu": mu}
