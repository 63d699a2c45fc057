"""Input checks and image conversions shared by the built-in rewards.

CLIP-style preprocessing runs in torch on the `(B, C, H, W)` [0, 1] images the rewards
receive: no PIL round trip, no uint8 quantisation, differentiable, on the reward's device.
It follows the Hugging Face ``CLIPImageProcessor`` geometry: resize the shortest edge
(bicubic, antialiased like PIL's), centre crop with ``top = (H - h) // 2``, normalise.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# PIL resample codes as stored in preprocessor_config.json -> torch interpolate modes.
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def check_batch(
    images: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]], *, reward: str
) -> None:
    """`ValueError` unless ``images`` is `(B, C, H, W)` with B prompts and B (or no) metadata."""
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{reward}: images must be a (B, C, H, W) tensor, got {shape}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{reward}: {images.shape[0]} images but {len(prompts)} prompts")
    if metadata and len(metadata) != images.shape[0]:
        raise ValueError(f"{reward}: {images.shape[0]} images but {len(metadata)} metadata entries")


def to_rgb(images: Tensor) -> Tensor:
    """`(B, C, H, W)` with C in {1, 3, 4} -> `(B, 3, H, W)` (grey repeated, alpha dropped)."""
    channels = images.shape[1]
    if channels == 3:
        return images
    if channels == 1:
        return images.expand(-1, 3, -1, -1)
    if channels == 4:
        return images[:, :3]
    raise ValueError(f"images have {channels} channels; expected 1, 3 or 4")


def to_uint8_hwc(images: Tensor) -> np.ndarray:
    """`(B, C, H, W)` float in [0, 1] -> `(B, H, W, 3)` uint8 numpy, rounded as ddpo does."""
    images = to_rgb(images.detach().float().cpu())
    return (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _hw(value: Any, *, key: str) -> tuple[int, int] | int:
    """A size entry: int or {"shortest_edge"} -> int; {"height", "width"} -> (h, w)."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict) and "shortest_edge" in value:
        return int(value["shortest_edge"])
    if isinstance(value, dict) and {"height", "width"} <= value.keys():
        return int(value["height"]), int(value["width"])
    raise ValueError(f"preprocessor config {key}={value!r}: expected an int or a size dict")


@dataclass(frozen=True)
class ClipPreprocess:
    """Resize (shortest edge or exact), centre crop and normalise `(B, C, H, W)` [0, 1] images."""

    size: int | tuple[int, int] = 224  # int: shortest edge; (h, w): exact size
    crop_size: tuple[int, int] | None = (224, 224)  # None: no crop
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    mode: str = "bicubic"

    @classmethod
    def from_dir(cls, directory: Path) -> ClipPreprocess:
        """From a directory's ``preprocessor_config.json`` (OpenAI CLIP defaults if absent)."""
        path = Path(directory) / "preprocessor_config.json"
        if not path.is_file():
            return cls()
        cfg = json.loads(path.read_text())
        crop = (
            _hw(cfg.get("crop_size", 224), key="crop_size")
            if cfg.get("do_center_crop", True)
            else None
        )
        if isinstance(crop, int):
            crop = (crop, crop)
        resample = int(cfg.get("resample", 3))
        if resample not in _RESAMPLE:
            raise ValueError(
                f"{path}: resample={resample} unsupported; expected one of {sorted(_RESAMPLE)}"
            )
        return cls(
            size=_hw(cfg.get("size", 224), key="size"),
            crop_size=crop,
            mean=tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)),
            std=tuple(cfg.get("image_std", OPENAI_CLIP_STD)),
            mode=_RESAMPLE[resample],
        )

    def resized_hw(self, height: int, width: int) -> tuple[int, int]:
        """Output size of the resize step (transformers' shortest-edge rule, truncating)."""
        if isinstance(self.size, tuple):
            return self.size
        if height <= width:
            return self.size, int(self.size * width / height)
        return int(self.size * height / width), self.size

    def __call__(self, images: Tensor) -> Tensor:
        """`(B, C, H, W)` float in [0, 1] -> `(B, 3, h, w)` float32 normalised pixel values."""
        x = to_rgb(images.float())
        new_hw = self.resized_hw(x.shape[-2], x.shape[-1])
        if new_hw != tuple(x.shape[-2:]):
            antialias = self.mode in ("bilinear", "bicubic")  # PIL filters are antialiased
            x = F.interpolate(
                x,
                size=new_hw,
                mode=self.mode,
                antialias=antialias,
                align_corners=False if antialias else None,
            )
            x = x.clamp(0, 1)  # bicubic overshoot; PIL's uint8 output is clamped too
        if self.crop_size is not None:
            x = _center_crop(x, self.crop_size)
        mean = x.new_tensor(self.mean).view(1, -1, 1, 1)
        std = x.new_tensor(self.std).view(1, -1, 1, 1)
        return (x - mean) / std


def _center_crop(x: Tensor, crop_hw: tuple[int, int]) -> Tensor:
    height, width = x.shape[-2:]
    crop_h, crop_w = crop_hw
    if crop_h > height or crop_w > width:
        raise ValueError(f"centre crop {crop_hw} larger than the resized image {(height, width)}")
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return x[..., top : top + crop_h, left : left + crop_w]
