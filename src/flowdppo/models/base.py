"""The model-adapter interface every model family implements (toy, SD3, FLUX.1, FLUX.2).

An adapter knows nothing of RL: it encodes prompts, predicts a velocity at ``(x_t, t)``,
decodes latents to images and gives the sampling time grid. LoRA, checkpoint I/O, EMA
and distributed wrapping live elsewhere. Times ``t`` are in [0, 1] (1 = noise); the
model's own timestep scale (0-1000 for SD3) appears only inside the adapter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..registry import Registry


@dataclass(frozen=True)
class Conditioning:
    """Encoded prompts as named tensors, batch first (what an adapter's forward needs).

    Example keys: ``prompt_embeds`` (B, L, C), ``pooled_prompt_embeds`` (B, C),
    ``negative_prompt_embeds`` (B, L, C) when CFG is used.
    """

    tensors: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0] if self.tensors else 0

    def index(self, idx: Tensor | slice | Sequence[int]) -> Conditioning:
        """Rows ``idx`` of every tensor."""
        if not isinstance(idx, (slice, Tensor)):
            idx = torch.as_tensor(list(idx), dtype=torch.long)
        return Conditioning({k: v[idx] for k, v in self.tensors.items()})

    def repeat_interleave(self, repeats: int) -> Conditioning:
        """Each row repeated ``repeats`` times in place (group sampling)."""
        return Conditioning({k: v.repeat_interleave(repeats, dim=0) for k, v in self.tensors.items()})

    def to(self, device: torch.device | str) -> Conditioning:
        return Conditioning({k: v.to(device) for k, v in self.tensors.items()})

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """Concatenate along the batch."""
        keys = parts[0].tensors.keys()
        return Conditioning({k: torch.cat([p.tensors[k] for p in parts]) for k in keys})


class FlowModel(ABC):
    """Adapter around a flow-matching transformer.

    Attributes:
        transformer (`nn.Module`): the denoiser; LoRA is injected into it and it is what
            the optimizer trains. Its parameters are the only trainable ones.
        latent_shape (`tuple[int, ...]`): ``(C, H, W)`` of one latent (the "D" of SPEC §1
            is their product).
        lora_target_modules (`tuple[str, ...]`): module names LoRA wraps for this family.
        image_channels (`int`): channels of decoded images (1 for the toy digits).
    """

    transformer: nn.Module
    latent_shape: tuple[int, ...]
    lora_target_modules: tuple[str, ...] = ()
    image_channels: int = 3

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Encode prompts once (adapters cache by prompt string). Rows follow ``prompts``."""

    @abstractmethod
    def predict_velocity(
        self, x_t: Tensor, t: Tensor, cond: Conditioning, guidance_scale: float = 1.0
    ) -> Tensor:
        """Velocity ``v = eps - x0`` at ``x_t``.

        Args:
            x_t (`Tensor` of shape `(B, *latent_shape)`): the noisy latent.
            t (`Tensor` of shape `(B,)`): times in [0, 1].
            cond (`Conditioning` of length `B`): encoded prompts.
            guidance_scale (`float`, defaults to 1.0): classifier-free guidance; > 1 runs
                the conditional and unconditional halves in one batch, both in the graph.

        Returns:
            `Tensor` of shape `(B, *latent_shape)` in float32.
        """

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Images of shape `(B, image_channels, H, W)` (video models: `(B, image_channels, F,
        H, W)`, F frames), float32 in [0, 1]."""

    @abstractmethod
    def sigmas(self, num_steps: int) -> Tensor:
        """The sampling grid ``t_0 = 1 > ... > t_K = 0``, shape `(num_steps + 1,)`, float64."""

    def initial_noise(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Standard normal latents of shape `(batch_size, *latent_shape)`, float32."""
        return torch.randn(
            (batch_size, *self.latent_shape), generator=generator, device=self.device
        )

    def enable_gradient_checkpointing(self) -> None:
        enable = getattr(self.transformer, "enable_gradient_checkpointing", None)
        if enable is None:
            raise ValueError(f"{type(self).__name__} does not support gradient checkpointing")
        enable()

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the whole model (weights as they are now) where the family's loader reads it."""
        raise NotImplementedError(f"{type(self).__name__} cannot save itself")

    def export_lora(self, lora_state_dict: dict[str, Tensor], directory: str | Path) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` loadable by the family's pipeline.

        Args:
            lora_state_dict: peft's LoRA weights of ``transformer`` (``get_peft_model_state_dict``).
            directory: output folder (created).
        """
        raise NotImplementedError(f"{type(self).__name__} has no diffusers LoRA export")


MODELS: Registry[Callable[..., FlowModel]] = Registry("model")


def register_model(name: str) -> Callable[[Callable[..., FlowModel]], Callable[..., FlowModel]]:
    """Decorator registering an adapter factory ``(**kwargs) -> FlowModel`` under ``name``."""
    return MODELS.register(name)


def build_model(name: str, **kwargs: Any) -> FlowModel:
    """Build a registered adapter (or ``package.module:factory``); an unknown name raises
    with the valid names."""
    return MODELS.lookup(name)(**kwargs)
