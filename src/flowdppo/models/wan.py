"""Wan 2.1 text-to-video adapter (``WanPipeline``: Wan-AI/Wan2.1-T2V-1.3B / 14B-Diffusers).

What follows the installed pipeline's ``__call__`` (diffusers 0.42):

1. Prompts: ``encode_prompt`` (UMT5; embeddings zero-padded to ``max_sequence_length``,
   no mask: the pipeline passes none either). The negative is ``negative_prompt``
   (default ``""``, the pipeline's).
2. Latents are 5-D: ``(16, F', H/8, W/8)`` per sample with ``F' = (num_frames - 1) / 4 + 1``
   (the VAE compresses time 4x, keeping the first frame); ``(1, 2, 2)`` patches inside the
   transformer. Everything downstream (rollout, replay, per-element KL) sees
   ``latent_shape`` only, so a frame is just more elements.
3. Timestep: the transformer takes the scheduler's 0-1000 value, ``1000 t``.
4. CFG (``guidance_scale > 1``): [negative, cond] in ONE batch, ``v = v_u + w (v_c - v_u)``
   (the pipeline makes two calls; same result).
5. Output ``eps - x0`` (``flow_prediction``).
6. Decode: ``z * latents_std + latents_mean``, the 3-D VAE; videos `(B, F, 3, H, W)`.
7. Grid, and the one deliberate departure: the checkpoints ship ``UniPCMultistepScheduler``
   (``flow_shift`` 3.0 for 480p, 5.0 recommended for 720p). A multistep solver's update
   uses earlier model outputs, so its transition is not the one-step Gaussian policy whose
   log-probability and exact KL Flow-DPPO computes. Training therefore steps with Euler on
   the ``FlowMatchEulerDiscreteScheduler`` grid with the checkpoint's shift (Flow-GRPO and
   DanceGRPO also sample Wan with Euler steps; diffusers' WanPipeline runs with this
   scheduler unchanged, which the tests check): the ODE / SDE / CPS steps are then exactly
   SPEC's per-step policy. That grid is made for a first-order sampler: it ends near 0
   (0.009 -> 0 at K = 10, shift 3), whereas UniPC's own grid ends 0.25 -> 0, a step only a
   higher-order solver takes well. ``train_grid="scheduler"`` takes the shipped
   scheduler's sigmas instead (still Euler steps). The shipped scheduler stays on ``pipe``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import register_model
from .diffusers_common import scheduler_sigmas
from .family_common import NegativePromptModel

_ATTENTION = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",  # self-attention
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",  # cross-attention to text
)


def wan_flow_shift(scheduler_config: Any) -> float:
    """The shift of a Wan scheduler config: UniPC / DPM++ ``flow_shift``, FlowMatch ``shift``."""
    for key in ("flow_shift", "shift"):
        value = scheduler_config.get(key)
        if value is not None:
            return float(value)
    raise ValueError("the scheduler config has neither `flow_shift` nor `shift`; pass "
                     "`flow_shift` to the wan adapter (3.0 for 480p, 5.0 for 720p)")


@register_model("wan")
class WanModel(NegativePromptModel):
    """Wan 2.1 text-to-video flow model; arguments as :class:`DiffusersFlowModel` plus

    Args:
        num_frames (`int`, defaults to 81): video frames, of the form 4k + 1.
        height (`int`, *optional*), width (`int`, *optional*): pixels, multiples of 16
            (default: ``resolution`` for both; Wan's native 480p is 480 x 832).
        flow_shift (`float`, *optional*): shift of the training grid (default: the
            checkpoint scheduler's ``flow_shift``).
        negative_prompt (`str`, defaults to ``""``): the CFG negative.
        train_grid (`str`, defaults to ``"euler"``): ``"euler"`` (the FlowMatch Euler grid
            with ``flow_shift``) or ``"scheduler"`` (the shipped scheduler's sigmas).

    LoRA targets the self- and cross-attention projections of every block.
    ``decode`` returns videos `(B, F, 3, H, W)` in [0, 1].
    """

    family = "wan"
    pipeline_class_name = "WanPipeline"
    default_max_sequence_length = 512  # the pipeline's __call__ default
    lora_target_modules = _ATTENTION

    def _init_family(self, num_frames: int = 81, height: int | None = None,
                     width: int | None = None, flow_shift: float | None = None,
                     negative_prompt: str = "", train_grid: str = "euler",
                     **options: Any) -> None:
        super()._init_family(**options)
        self._init_negative(negative_prompt)
        if self.pipe.transformer is None or self.pipe.config.get("boundary_ratio") is not None:
            raise ValueError("WanPipeline with transformer_2 / boundary_ratio (Wan 2.2 A14B) is "
                             "not supported: the wan adapter trains one transformer")
        temporal = self.pipe.vae_scale_factor_temporal
        if num_frames < 1 or (num_frames - 1) % temporal:
            raise ValueError(f"num_frames={num_frames}: Wan needs {temporal}k + 1 frames "
                             f"(e.g. {temporal * ((num_frames - 1) // temporal) + 1})")
        if train_grid not in ("euler", "scheduler"):
            raise ValueError(f"train_grid={train_grid!r}: expected 'euler' or 'scheduler'")
        self.train_grid = train_grid
        self.num_frames = int(num_frames)
        self.height = int(height or self.resolution)
        self.width = int(width or self.resolution)
        self.flow_shift = float(flow_shift) if flow_shift is not None else \
            wan_flow_shift(self.pipe.scheduler.config)

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (diffusers keeps Wan's norms and time embedding in fp32, so the
        first parameter's dtype is not it)."""
        return self._weight_dtype

    @classmethod
    def _check_resolution(cls, resolution: int, transformer_config: Any, vae_factor: int) -> None:
        """Wan checks its height and width (not one square side) in ``_latent_shape``."""

    def _latent_shape(self, resolution: int) -> tuple[int, int, int, int]:
        spatial = self.pipe.vae_scale_factor_spatial
        multiple = spatial * self.pipe.transformer.config.patch_size[1]
        for name, value in (("height", self.height), ("width", self.width)):
            if value <= 0 or value % multiple:
                raise ValueError(f"{name}={value} (resolution={self.resolution}): Wan needs a "
                                 f"positive multiple of {multiple} pixels")
        frames = (self.num_frames - 1) // self.pipe.vae_scale_factor_temporal + 1
        channels = self.pipe.transformer.config.in_channels
        return (channels, frames, self.height // spatial, self.width // spatial)

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, _ = self.pipe.encode_prompt(
            prompt=list(prompts), do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length, device=self._text_device)
        return {"prompt_embeds": embeds}

    def _run(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return self.transformer(
            hidden_states=x,  # (B, C, F', h, w)
            timestep=t * 1000.0,
            encoder_hidden_states=cond["prompt_embeds"],
            return_dict=False,
        )[0]

    def _forward(self, x: Tensor, t: Tensor, tensors: dict[str, Tensor],
                 guidance_scale: float) -> Tensor:
        if guidance_scale <= 1.0:
            return self._run(x, t, tensors)
        v_uncond, v_cond = self._run(*self._with_negative(x, t, tensors)).chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    def train_scheduler(self) -> Any:
        """The Euler flow scheduler that defines the training grid (see the module notes)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        num_train = self.pipe.scheduler.config.get("num_train_timesteps", 1000)
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train,
                                               shift=self.flow_shift)

    def sigmas(self, num_steps: int) -> Tensor:
        if self.train_grid == "scheduler":
            return scheduler_sigmas(self.pipe.scheduler, num_steps)
        return scheduler_sigmas(self.train_scheduler(), num_steps)

    def _to_vae_latents(self, latents: Tensor) -> Tensor:
        config = self.pipe.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean, device=latents.device).view(shape)
        std = torch.tensor(config.latents_std, device=latents.device).view(shape)
        return latents * std + mean

    def decode(self, latents: Tensor) -> Tensor:
        """VAE decode in the VAE's dtype; videos `(B, F, 3, H, W)` in [0, 1]."""
        vae = self.pipe.vae
        with torch.autocast(latents.device.type, enabled=False):
            z = self._to_vae_latents(latents.to(vae.device, torch.float32)).to(vae.dtype)
            video = vae.decode(z, return_dict=False)[0]  # (B, 3, F, H, W) in [-1, 1]
        return (video.float() / 2 + 0.5).clamp(0.0, 1.0).permute(0, 2, 1, 3, 4)
