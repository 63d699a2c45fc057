"""Z-Image adapter (``ZImagePipeline``: Tongyi-MAI/Z-Image and Z-Image-Turbo).

What follows the installed pipeline's ``__call__`` (diffusers 0.42):

1. Prompts: ``encode_prompt`` chat-templates each prompt (thinking on), runs the Qwen3
   encoder and keeps the second-to-last hidden state of the valid tokens. The pipeline
   rewrites a list prompt in place, so it always gets a fresh list here. Rows are stored
   zero-padded with ``prompt_embeds_mask``; the forward hands the transformer the list of
   valid rows, exactly the pipeline's input.
2. Latents ``(16, H/8, W/8)``; the transformer takes a list of ``(16, 1, H/8, W/8)``.
3. Timestep: the transformer takes ``1 - t`` (0 = noise), computed as the pipeline does
   from the scheduler's 0-1000 value: ``(1000 - 1000 t) / 1000``.
4. Output: the transformer predicts ``x0 - eps``; the pipeline negates it, and so do we.
5. CFG: the pipeline's ``guidance_scale`` ``g`` means ``v = v_c + g (v_c - v_u)``, i.e. the
   usual ``v = v_u + w (v_c - v_u)`` with ``w = g + 1``. flowdppo's ``guidance_scale`` is
   that ``w`` for every family (CFG on when ``w > 1``): pipeline ``g = 4`` is ``5.0`` here;
   Turbo (``g = 0``) is ``1.0``. The pipeline's optional ``cfg_normalization`` and
   ``cfg_truncation`` are off by default and not used.
6. Decode: ``z / scaling_factor + shift_factor`` (the FLUX VAE).
7. Grid: ``sigmas = linspace(1, 1/K, K)`` through the checkpoint's scheduler with
   ``mu = calculate_shift(H/16 * W/16)`` (used only if the scheduler shifts dynamically;
   Turbo's is a static shift 3).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import register_model
from .family_common import NegativePromptModel, pad_rows, valid_rows

_ATTENTION = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")


def zimage_timestep(t: Tensor) -> Tensor:
    """The Z-Image transformer's time for ``t`` in [0, 1]: ``1 - t`` via the 0-1000 scale."""
    return (1000.0 - t.float() * 1000.0) / 1000.0


@register_model("zimage")
class ZImageModel(NegativePromptModel):
    """Z-Image text-to-image flow model; arguments as :class:`DiffusersFlowModel` plus

    Args:
        negative_prompt (`str`, defaults to ``""``): the CFG negative (the pipeline's default).

    LoRA targets every attention projection (``to_q/k/v``, ``to_out.0``) of the main
    single-stream layers and of the noise and context refiners (suffix match).
    """

    family = "zimage"
    pipeline_class_name = "ZImagePipeline"
    default_max_sequence_length = 512  # the pipeline's __call__ default
    lora_target_modules = _ATTENTION

    def _init_family(self, negative_prompt: str = "", **options: Any) -> None:
        super()._init_family(**options)
        self._init_negative(negative_prompt)

    def _latent_shape(self, resolution: int) -> tuple[int, int, int]:
        factor = self.pipe.vae_scale_factor
        side = resolution // factor
        return (self.pipe.transformer.in_channels, side, side)

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        rows, _ = self.pipe.encode_prompt(
            prompt=list(prompts), device=self._text_device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return pad_rows(rows, self.max_sequence_length)

    def _run(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        out = self.transformer(
            list(x.unsqueeze(2).unbind(0)),  # B tensors (C, 1, h, w)
            zimage_timestep(t),
            valid_rows(cond["prompt_embeds"], cond["prompt_embeds_mask"]),
            return_dict=False,
        )[0]
        return -torch.stack(out).squeeze(2)  # the model predicts x0 - eps

    def _forward(self, x: Tensor, t: Tensor, tensors: dict[str, Tensor],
                 guidance_scale: float) -> Tensor:
        if guidance_scale <= 1.0:
            return self._run(x, t, tensors)
        v_uncond, v_cond = self._run(*self._with_negative(x, t, tensors)).float().chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    def _schedule_kwargs(self, num_steps: int) -> dict[str, Any]:
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

        config = self.pipe.scheduler.config
        _, height, width = self.latent_shape
        mu = calculate_shift(
            (height // 2) * (width // 2), config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        sigmas = torch.linspace(1.0, 1 / num_steps, num_steps).tolist()  # pipeline default
        return {"sigmas": sigmas, "mu": mu}
