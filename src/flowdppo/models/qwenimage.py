"""Qwen-Image adapter (``QwenImagePipeline``: Qwen/Qwen-Image, Qwen/Qwen-Image-2512).

What follows the installed pipeline's ``__call__`` (diffusers 0.42):

1. Prompts: ``encode_prompt`` runs Qwen2.5-VL on the chat-templated prompt, drops the
   34-token system prefix and keeps the last hidden state of the valid tokens. Rows are
   stored zero-padded to ``max_sequence_length`` with ``prompt_embeds_mask``; the
   transformer masks padded text tokens out of the joint attention and its text RoPE is
   per position, so padding leaves the image tokens unchanged.
2. Latents stay unpacked at the adapter boundary, ``(16, H/8, W/8)`` (the pipeline's 5-D
   latent with its single frame dropped); the 2x2 packing into ``(H/16 * W/16, 64)`` tokens
   happens in the forward with the pipeline's own helpers, ``img_shapes = [(1, H/16, W/16)]``.
3. Timestep: the transformer takes ``t`` in [0, 1] (see :func:`flux_timestep`).
4. True CFG (``guidance_scale > 1``, the pipeline's ``true_cfg_scale``): the pipeline does it
   only when a negative prompt is given, so the adapter always gives one (``negative_prompt``,
   default ``" "`` as in Qwen-Image's model card). [negative, cond] run in ONE batch, both in
   the graph; ``v = v_n + w (v_c - v_n)`` is then rescaled per token to the conditional
   prediction's norm, ``v * |v_c| / |v|``, exactly as the pipeline does.
5. Output ``eps - x0`` (fed to ``scheduler.step``).
6. Decode: ``z * latents_std + latents_mean``, the 3-D VAE on one frame.
7. Grid: ``sigmas = linspace(1, 1/K, K)`` with ``mu = calculate_shift(H/16 * W/16)`` (the
   checkpoint's exponential dynamic shift) and its ``shift_terminal`` stretch (0.02 for
   Qwen-Image), terminal 0 appended. The stretch divides by zero at K = 1: K >= 2.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import register_model
from .diffusers_common import flux_timestep
from .family_common import NegativePromptModel, pad_rows
from .flux import flux_schedule_sigmas

_ATTENTION = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)


def qwen_cfg(v_neg: Tensor, v_cond: Tensor, guidance_scale: float) -> Tensor:
    """The pipeline's true CFG on packed tokens `(B, N, 64)`: combine, then give each token the
    conditional prediction's norm."""
    combined = v_neg + guidance_scale * (v_cond - v_neg)
    cond_norm = torch.norm(v_cond, dim=-1, keepdim=True)
    return combined * (cond_norm / torch.norm(combined, dim=-1, keepdim=True))


@register_model("qwenimage")
class QwenImageModel(NegativePromptModel):
    """Qwen-Image text-to-image flow model; arguments as :class:`DiffusersFlowModel` plus

    Args:
        negative_prompt (`str`, defaults to ``" "``): the true-CFG negative.

    LoRA targets the dual-stream blocks' attention: image ``to_q/k/v/out`` and text
    ``add_q/k/v_proj`` / ``to_add_out`` (the MLPs ``img_mlp`` / ``txt_mlp`` that verl's
    recipe adds can be named in ``lora.target_modules``).
    """

    family = "qwenimage"
    pipeline_class_name = "QwenImagePipeline"
    default_max_sequence_length = 512  # the pipeline's __call__ default
    lora_target_modules = _ATTENTION

    def _init_family(self, negative_prompt: str = " ", **options: Any) -> None:
        super()._init_family(**options)
        self._init_negative(negative_prompt)
        if self.pipe.transformer.config.guidance_embeds:
            raise ValueError("this Qwen-Image transformer has a guidance embedding "
                             "(guidance-distilled); flowdppo supports the true-CFG checkpoints")

    def _latent_shape(self, resolution: int) -> tuple[int, int, int]:
        factor = self.pipe.vae_scale_factor
        side = resolution // factor
        return (self.pipe.transformer.config.in_channels // 4, side, side)

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, mask = self.pipe.encode_prompt(
            prompt=list(prompts), device=self._text_device,
            max_sequence_length=self.max_sequence_length)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], device=embeds.device)
        rows = [e[m.bool()] for e, m in zip(embeds, mask)]
        return pad_rows(rows, self.max_sequence_length)

    def _run(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """One transformer call on packed tokens; returns packed `(B, N, 64)`."""
        from diffusers import QwenImagePipeline as Pipe

        batch, channels, height, width = x.shape
        mask = cond["prompt_embeds_mask"] > 0.5
        # Cut the padding to the batch's longest prompt, as the pipeline pads: the same
        # result, without attending over max_sequence_length text tokens every call.
        longest = max(int(mask.sum(1).max()), 1)
        mask, embeds = mask[:, :longest], cond["prompt_embeds"][:, :longest]
        return self.transformer(
            hidden_states=Pipe._pack_latents(x, batch, channels, height, width),
            timestep=flux_timestep(t, x.dtype),
            guidance=None,
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            encoder_hidden_states=embeds,
            img_shapes=[[(1, height // 2, width // 2)]] * batch,
            return_dict=False,
        )[0]

    def _forward(self, x: Tensor, t: Tensor, tensors: dict[str, Tensor],
                 guidance_scale: float) -> Tensor:
        from diffusers import QwenImagePipeline as Pipe

        if guidance_scale > 1.0:
            v_neg, v_cond = self._run(*self._with_negative(x, t, tensors)).chunk(2)
            out = qwen_cfg(v_neg, v_cond, guidance_scale)
        else:
            out = self._run(x, t, tensors)
        factor = self.pipe.vae_scale_factor
        height, width = x.shape[-2] * factor, x.shape[-1] * factor
        return Pipe._unpack_latents(out, height, width, factor).squeeze(2)

    def _to_vae_latents(self, latents: Tensor) -> Tensor:
        """``z * std + mean`` per channel, with the 3-D VAE's frame axis added."""
        config = self.pipe.vae.config
        shape = (1, config.z_dim, 1, 1)
        mean = torch.tensor(config.latents_mean, device=latents.device).view(shape)
        std = torch.tensor(config.latents_std, device=latents.device).view(shape)
        return (latents * std + mean).unsqueeze(2)

    def decode(self, latents: Tensor) -> Tensor:
        """VAE decode of the single frame; images `(B, 3, H, W)` in [0, 1]."""
        vae = self.pipe.vae
        with torch.autocast(latents.device.type, enabled=False):
            z = self._to_vae_latents(latents.to(vae.device, torch.float32)).to(vae.dtype)
            images = vae.decode(z, return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0.0, 1.0)

    def _schedule_kwargs(self, num_steps: int) -> dict[str, Any]:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        config = self.pipe.scheduler.config
        if num_steps < 2 and config.get("shift_terminal"):
            raise ValueError(f"num_steps={num_steps}: Qwen-Image's scheduler (shift_terminal="
                             f"{config.get('shift_terminal')}) needs at least 2 sampling steps")
        _, height, width = self.latent_shape
        mu = calculate_shift(
            (height // 2) * (width // 2), config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return {"sigmas": flux_schedule_sigmas(config, num_steps), "mu": mu}
