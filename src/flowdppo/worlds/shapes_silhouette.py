"""A second shapes judge, independent of the reward's: silhouettes in their bounding box.

The shapes rewards score a shape by analysis by synthesis (`shapes_rewards`: an 11x11
window's cosine to the renderer's templates at fixed sizes and offsets). A policy trained
on that score could learn to please the template matcher rather than draw the shape, so
the headroom benchmark (`shapes_novel`) also reads shapes with a different rule:

1. Objects are the same thresholded components (what counts as an object is not in doubt);
2. each object's binary silhouette (its pixels above the threshold, no intensities) is
   resampled to an 8x8 grid spanning its own bounding box, so size and position drop out
   and the aspect ratio is normalised away;
3. the shape is the nearest class-mean silhouette (squared distance). The class means are
   fitted once on `FIT_IMAGES` renders of the *training* split (fixed seed), so the judge
   never saw a held-out colour-shape pair either.

Accuracy on fresh renders of the held-out pairs: about 0.97 (the test checks > 0.93).
Monitor ``shapes_silhouette``: ``silhouette_acc_shape``, the share of images whose objects
are all read as the asked shape (0 when no object is found).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..rewards.base import register_monitor
from .shapes import SHAPES, sample_dataset, scene_from_metadata
from .shapes_rewards import find_objects

GRID = 8  # silhouette resolution inside the bounding box
FIT_IMAGES = 2000
FIT_SEED = 5


def silhouettes(images: Tensor) -> tuple[Tensor, Tensor]:
    """Each object's bounding-box silhouette `(M, GRID*GRID)` and its image index `(M,)`."""
    _, labels, image_of = find_objects(images.detach().float().cpu().clamp(0, 1))
    num = image_of.numel()
    if num == 0:
        return torch.zeros(0, GRID * GRID), image_of
    own = (labels[image_of] == torch.arange(1, num + 1).view(-1, 1, 1)).float()  # (M, H, W)
    _, height, width = own.shape
    rows, cols = own.amax(dim=2) > 0, own.amax(dim=1) > 0
    index_h, index_w = torch.arange(height), torch.arange(width)
    top = torch.where(rows, index_h, height).amin(dim=1).float()
    bottom = torch.where(rows, index_h, -1).amax(dim=1).float() + 1
    left = torch.where(cols, index_w, width).amin(dim=1).float()
    right = torch.where(cols, index_w, -1).amax(dim=1).float() + 1
    steps = (torch.arange(GRID, dtype=torch.float32) + 0.5) / GRID
    ys = top.view(-1, 1) + steps * (bottom - top).view(-1, 1)  # pixel coordinates
    xs = left.view(-1, 1) + steps * (right - left).view(-1, 1)
    grid = torch.stack([(xs / width * 2 - 1).view(-1, 1, GRID).expand(-1, GRID, GRID),
                        (ys / height * 2 - 1).view(-1, GRID, 1).expand(-1, GRID, GRID)], dim=-1)
    sampled = F.grid_sample(own[:, None], grid, mode="bilinear", align_corners=False)[:, 0]
    return sampled.flatten(1), image_of


@lru_cache(maxsize=1)
def class_means() -> Tensor:
    """`(4, GRID*GRID)` mean silhouette per shape, from training-split renders (built once)."""
    images, scenes = sample_dataset(FIT_IMAGES, FIT_SEED, split="train")
    shapes, image_of = silhouettes(images)
    label = torch.tensor([SHAPES.index(scenes[i].shape) for i in image_of.tolist()])
    return torch.stack([shapes[label == k].mean(dim=0) for k in range(len(SHAPES))])


def read_shapes(images: Tensor) -> tuple[Tensor, Tensor]:
    """Each object's shape index `(M,)` (into `SHAPES`) and its image index `(M,)`."""
    shapes, image_of = silhouettes(images)
    if shapes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long), image_of
    distance = ((shapes[:, None] - class_means()[None]) ** 2).sum(dim=-1)
    return distance.argmin(dim=1), image_of


def shape_correct(images: Tensor, asked: Tensor) -> Tensor:
    """`(B,)` bool: the image has an object and every object reads as ``asked`` `(B,)`."""
    read, image_of = read_shapes(images)
    batch = images.shape[0]
    objects = torch.bincount(image_of, minlength=batch)
    right = torch.bincount(image_of, weights=(read == asked[image_of]).float(), minlength=batch)
    return (objects > 0) & (right == objects)


@register_monitor("shapes_silhouette")
def shapes_silhouette(device: str = "cpu"):
    """Shape accuracy read from bounding-box silhouettes (independent of the shapes rewards)."""
    del device  # the judge runs on the CPU

    def monitor(images: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
                ) -> dict[str, float]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) RGB in [0, 1]; got {tuple(images.shape)}")
        meta = list(metadata) if metadata is not None else [{}] * len(prompts)
        scenes = [scene_from_metadata(p, m) for p, m in zip(prompts, meta)]
        asked = torch.tensor([SHAPES.index(s.shape) for s in scenes])
        return {"silhouette_acc_shape": float(shape_correct(images, asked).float().mean())}

    return monitor
