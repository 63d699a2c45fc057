"""Model-free rewards: JPEG (in)compressibility, as in DDPO (Black et al. 2023).

    size_i = len(JPEG(uint8(round(255 * image_i)), quality=95)) / 1000      (kB)
    jpeg_compressibility_i = -size_i
    jpeg_incompressibility_i = +size_i

Flat, simple images compress well (high compressibility); noise and detail do not.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .base import Reward, RewardOutput, register_reward
from .preprocess import check_batch, to_uint8_hwc


def jpeg_sizes_kb(images: Tensor, quality: int = 95) -> Tensor:
    """JPEG sizes of `(B, C, H, W)` [0, 1] images -> `(B,)` float32 kilobytes (1 kB = 1000 B)."""
    sizes = []
    for array in to_uint8_hwc(images):  # (H, W, 3) uint8
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


@dataclass(frozen=True)
class JpegSizeReward:
    """``sign * size_kB`` per image; prompts and metadata are ignored."""

    name: str
    sign: float
    quality: int = 95

    def __call__(
        self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> RewardOutput:
        check_batch(images, prompts, metadata, reward=self.name)
        sizes = jpeg_sizes_kb(images, quality=self.quality)
        return self.sign * sizes, {}


def _check_quality(quality: int, name: str) -> int:
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"{name}: quality={quality}; expected an integer in [1, 100]")
    return int(quality)


@register_reward("jpeg_compressibility")
def jpeg_compressibility(quality: int = 95, device: str = "cpu") -> Reward:
    """``-(JPEG size in kB)`` at ``quality``; ``device`` is accepted and unused (CPU codec)."""
    name = "jpeg_compressibility"
    return JpegSizeReward(name=name, sign=-1.0, quality=_check_quality(quality, name))


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(quality: int = 95, device: str = "cpu") -> Reward:
    """``+(JPEG size in kB)`` at ``quality``; ``device`` is accepted and unused (CPU codec)."""
    name = "jpeg_incompressibility"
    return JpegSizeReward(name=name, sign=1.0, quality=_check_quality(quality, name))
