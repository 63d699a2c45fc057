"""FLUX.2 [klein] adapter (``Flux2KleinPipeline``: klein-base 4B/9B and the distilled ones).

What follows the installed pipeline's ``__call__`` (diffusers 0.42):

1. Prompts: ``encode_prompt`` runs Qwen3 on the chat-templated prompt and stacks the
   hidden states of ``text_encoder_out_layers`` (default 9, 18, 27): ``prompt_embeds``
   (B, L, 3 * hidden). The text position ids ``(0, 0, 0, l)`` are rebuilt in the forward.
2. Latents are the pipeline's own: the VAE latent patchified 2x2 and batch-normalised,
   ``(4 * 32, H/16, W/16)``; packing is a reshape to ``(H/16 * W/16, 128)`` tokens with
   image ids ``(0, row, col, 0)``. No guidance embedding (``guidance=None``).
3. Timestep: the transformer takes ``t`` in [0, 1] (see :func:`flux_timestep`).
4. CFG: the base (non-distilled) models use true CFG with the empty prompt as negative
   when ``guidance_scale > 1``: [uncond, cond] in ONE batch here (the pipeline makes two
   calls), ``v = v_u + w (v_c - v_u)``. Step-distilled models ignore the scale (warned).
5. Output ``eps - x0`` (fed to ``scheduler.step`` by the pipeline).
6. Decode: ``z * sqrt(bn_var + eps) + bn_mean``, un-patchify, VAE decode.
7. Grid: ``sigmas = linspace(1, 1/K, K)`` shifted with
   ``mu = compute_empirical_mu(seq_len, K)`` (depends on the step count too).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from .base import register_model
from .diffusers_common import DiffusersFlowModel, flux_timestep
from .flux import flux_schedule_sigmas

logger = logging.getLogger(__name__)

_ATTENTION = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "attn.to_qkv_mlp_proj",
)


@register_model("flux2")
class Flux2Model(DiffusersFlowModel):
    """FLUX.2-klein text-to-image flow model; arguments as :class:`DiffusersFlowModel` plus

    Args:
        text_encoder_out_layers (`tuple[int, ...]`, defaults to (9, 18, 27)): Qwen3 hidden
            states stacked into the prompt embedding (the pipeline's default).

    LoRA targets the double blocks' attention (image and text), the single blocks' fused
    qkv+MLP input ``to_qkv_mlp_proj`` and their output ``attn.to_out`` (named per block:
    a bare ``attn.to_out`` would match the double blocks' ModuleList, which peft rejects).
    """

    family = "flux2"
    pipeline_class_name = "Flux2KleinPipeline"
    default_max_sequence_length = 512
    default_num_steps = 50
    default_guidance_scale = 4.0

    def _init_family(self, text_encoder_out_layers: tuple[int, ...] = (9, 18, 27),
                     **options: Any) -> None:
        super()._init_family(**options)
        self.text_encoder_out_layers = tuple(int(i) for i in text_encoder_out_layers)
        self._distilled = bool(self.pipe.config.get("is_distilled", False))
        self._warned_distilled = False
        singles = tuple(f"single_transformer_blocks.{i}.attn.to_out"
                        for i in range(self.pipe.transformer.config.num_single_layers))
        self.lora_target_modules = (*_ATTENTION, *singles)

    def _latent_shape(self, resolution: int) -> tuple[int, int, int]:
        side = resolution // (2 * self.pipe.vae_scale_factor)  # VAE factor x 2x2 patchify
        return (self.pipe.transformer.config.in_channels, side, side)

    def _prepare_latents(self, batch: int, generator: torch.Generator | None) -> Tensor:
        channels, height, width = self.latent_shape
        packed, _ = self.pipe.prepare_latents(batch, channels // 4, self.resolution,
                                              self.resolution, self._weight_dtype, self.device,
                                              generator)  # (B, HW, C), row-major tokens
        return packed.transpose(1, 2).reshape(batch, channels, height, width)

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, _ = self.pipe.encode_prompt(
            prompt=prompts, device=self._text_device, max_sequence_length=self.max_sequence_length,
            text_encoder_out_layers=self.text_encoder_out_layers,
        )
        return {"prompt_embeds": embeds}

    def _use_cfg(self, guidance_scale: float) -> bool:
        if guidance_scale > 1.0 and self._distilled and not self._warned_distilled:
            logger.warning("guidance_scale=%s is ignored: this FLUX.2 model is step-distilled",
                           guidance_scale)
            self._warned_distilled = True
        return guidance_scale > 1.0 and not self._distilled

    def _forward(self, x: Tensor, t: Tensor, tensors: dict[str, Tensor],
                 guidance_scale: float) -> Tensor:
        from diffusers import Flux2KleinPipeline as Pipe

        def run(x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
            batch, channels, height, width = x.shape
            embeds = cond["prompt_embeds"]
            out = self.transformer(
                hidden_states=Pipe._pack_latents(x),  # (B, HW, C)
                timestep=flux_timestep(t, x.dtype),
                guidance=None,
                encoder_hidden_states=embeds,
                # Ids are equal across the batch and the transformer reads row 0 only.
                txt_ids=Pipe._prepare_text_ids(embeds[:1]).to(x.device),  # (1, L, 4)
                img_ids=Pipe._prepare_latent_ids(x[:1]).to(x.device),  # (1, HW, 4)
                return_dict=False,
            )[0]
            # Row-major ids: unpacking is the inverse reshape of _pack_latents.
            return out[:, : height * width].transpose(1, 2).reshape(batch, channels, height, width)

        return self._guided(run, x, t, tensors, guidance_scale, self._use_cfg(guidance_scale))

    def _to_vae_latents(self, latents: Tensor) -> Tensor:
        from diffusers import Flux2KleinPipeline

        vae = self.pipe.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        z = latents * std.to(latents.device, latents.dtype) + mean
        return Flux2KleinPipeline._unpatchify_latents(z)

    def _schedule_kwargs(self, num_steps: int) -> dict[str, Any]:
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        _, height, width = self.latent_shape
        mu = compute_empirical_mu(image_seq_len=height * width, num_steps=num_steps)
        return {"sigmas": flux_schedule_sigmas(self.pipe.scheduler.config, num_steps), "mu": mu}
