"""The toy video adapter: the toy SD3 transformer with the frames stacked in its channels.

The latent of one clip is the clip itself in [-1, 1], shape ``(C, F, H, W)`` (diffusers'
video layout; a batch is ``(B, C, F, H, W)``), so the trainer sees real 5-D video latents.
Inside ``predict_velocity`` the clip is viewed as an image of ``C * F`` channels: every 2x2
patch token carries that patch in every frame, and attention runs over the 64 spatial tokens
only. A spatio-temporal transformer (diffusers' ``WanTransformer3DModel``) would attend over
``F`` times as many tokens and cost ``F``-fold or more per step, too slow to pretrain a base in
about a minute on one CPU core; the Wan adapter exercises that class on real checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .base import Conditioning, register_model
from .toy import _DTYPES, ToyFlowModel, ToyTextEncoder

VIDEO_CONFIG_NAME = "video_config.json"


class ToyVideoFlowModel(ToyFlowModel):
    """Tiny text-to-video flow model (see the module docstring).

    Args:
        transformer (`SD3Transformer2DModel`): ``in_channels = channels * num_frames``.
        text_encoder, vocab, max_length, shift: as `ToyFlowModel`.
        num_frames (`int`): frames per clip F.
    """

    def __init__(self, transformer: nn.Module, text_encoder: ToyTextEncoder, vocab: Sequence[str],
                 max_length: int, shift: float = 1.0, *, num_frames: int) -> None:
        super().__init__(transformer, text_encoder, vocab, max_length, shift)
        stacked = transformer.config.in_channels
        if num_frames < 1 or stacked % num_frames:
            raise ValueError(f"num_frames={num_frames}: must divide the transformer's "
                             f"in_channels={stacked}")
        self.num_frames = num_frames
        self.image_channels = stacked // num_frames
        size = transformer.config.sample_size
        self.latent_shape = (self.image_channels, num_frames, size, size)

    @classmethod
    def create(cls, vocab: Sequence[str], *, num_frames: int = 4, channels: int = 3,
               **kwargs: Any) -> ToyVideoFlowModel:
        """A randomly initialised model (seeded); ``kwargs`` are `ToyFlowModel.create`'s."""
        image = ToyFlowModel.create(vocab, channels=channels * num_frames, **kwargs)
        return cls(image.transformer, image.text_encoder, image.vocab, image.max_length,
                   image.shift, num_frames=num_frames)

    def predict_velocity(self, x_t: Tensor, t: Tensor, cond: Conditioning,
                         guidance_scale: float = 1.0) -> Tensor:
        """Velocity of shape `(B, C, F, H, W)` for clips ``x_t`` of that shape."""
        if x_t.ndim != 5 or tuple(x_t.shape[1:]) != self.latent_shape:
            raise ValueError(f"x_t has shape {tuple(x_t.shape)}; expected (B, "
                             f"{', '.join(map(str, self.latent_shape))})")
        batch, channels, frames, height, width = x_t.shape
        stacked = x_t.reshape(batch, channels * frames, height, width)
        v = super().predict_velocity(stacked, t, cond, guidance_scale)
        return v.reshape(batch, channels, frames, height, width)

    def decode(self, latents: Tensor) -> Tensor:
        """Clips of shape `(B, C, F, H, W)`, float32 in [0, 1]."""
        return super().decode(latents)

    def save_pretrained(self, directory: str | Path) -> Path:
        """`ToyFlowModel.save_pretrained` plus ``video_config.json`` (the frame count)."""
        directory = super().save_pretrained(directory)
        (directory / VIDEO_CONFIG_NAME).write_text(json.dumps({"num_frames": self.num_frames}))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | str = torch.float32,
                        device: str | torch.device = "cpu") -> ToyVideoFlowModel:
        directory = Path(directory)
        if not (directory / VIDEO_CONFIG_NAME).is_file():
            raise ValueError(f"{directory}: no {VIDEO_CONFIG_NAME}, so not a toy video model; "
                             "use `model.name: toy` for image models or builtin:video here")
        num_frames = int(json.loads((directory / VIDEO_CONFIG_NAME).read_text())["num_frames"])
        image = ToyFlowModel.from_pretrained(directory, dtype=dtype, device=device)
        return cls(image.transformer, image.text_encoder, image.vocab, image.max_length,
                   image.shift, num_frames=num_frames)


@register_model("toy_video")
def build_toy_video(pretrained: str | None = None, dtype: str = "fp32", device: str = "cpu",
                    **kwargs: Any) -> ToyVideoFlowModel:
    """The toy video adapter from a saved directory (``builtin:video``), or a random one
    (``pretrained`` None or ``"tiny-random"``; ``kwargs`` are `ToyVideoFlowModel.create`'s,
    ``vocab`` required)."""
    if dtype not in _DTYPES:
        raise ValueError(f"`model.dtype`={dtype!r}: expected one of {sorted(_DTYPES)}")
    if pretrained in (None, "tiny-random"):
        if "vocab" not in kwargs:
            raise ValueError("a random toy video model needs `model.kwargs.vocab` (a list of "
                             "words); or set `model.pretrained` to builtin:video")
        model = ToyVideoFlowModel.create(**kwargs)
        model.transformer.to(device=device, dtype=_DTYPES[dtype])
        model.text_encoder.to(device)
        return model
    if kwargs:
        raise ValueError(f"`model.kwargs` {sorted(kwargs)}: a pretrained toy video model takes none")
    return ToyVideoFlowModel.from_pretrained(pretrained, dtype=_DTYPES[dtype], device=device)
