"""The programmatic judge of the shapes world and its rewards (one per clause, and their mean).

The judge is rule-based, with no learned weights:

1. Objects: pixels whose brightest channel exceeds `FG_THRESHOLD` form the foreground; its
   8-connected components of at least `MIN_OBJECT_AREA` pixels are the objects.
2. Colour: each object pixel's chromaticity ``rgb / max(rgb)`` is compared with the palette
   (softmax of minus squared distance / `COLOR_TEMPERATURE`); the image's colour
   probabilities are the intensity-weighted mean over object pixels.
3. Shape, by analysis by synthesis: an 11x11 window around each object is compared with a
   bank of the renderer's own shapes at every size 4.5-8.5 px and sub-pixel offset (0.25 px
   steps); a shape's misfit is ``1 - cos^2`` between the window and its best template (the
   brightness drops out). Probabilities: softmax of minus misfit / `SHAPE_TEMPERATURE`,
   averaged over the image's objects.
4. Position: the objects' intensity-weighted centroid relative to the image centre; the side
   scores (-dx, dx, -dy, dy) in pixels go through a softmax with `POSITION_TEMPERATURE`.
5. Count: the number of objects. Its soft score for ``n`` asked, from the object areas
   ``a_1 >= a_2 >= ...`` (``a_k = 0`` past the last object), is
   ``min(1, 2 a_n / a_1) * (1 - a_{n+1} / a_n)``: the n-th object is a real one (at least
   half the largest) and the next is absent or small; zero with fewer than n objects.

Soft clause scores are the judge's probability of the asked value (the count's as above),
in [0, 1]; with no object every score is 0. Hard predictions are the argmax (and the
object count); `clause_correct` compares them with the ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .clause_rewards import register_clause_rewards
from .shapes import CLAUSES, COLORS, POSITIONS, SHAPES, Scene, scene_from_metadata, shape_coverage

FG_THRESHOLD = 0.4
MIN_OBJECT_AREA = 4
COLOR_TEMPERATURE = 0.05
SHAPE_TEMPERATURE = 0.01
POSITION_TEMPERATURE = 0.4
WINDOW = 11  # shape window side (pixels); objects span at most 9
_PALETTE = torch.tensor(list(COLORS.values()))  # (4, 3)


@dataclass(frozen=True)
class Judgement:
    """What the judge sees in a batch of B images.

    Attributes:
        color_probs, shape_probs, position_probs (`Tensor` of shape `(B, 4)`): probabilities
            over `COLORS`, `SHAPES`, `POSITIONS` (rows of zeros where no object was found).
        object_areas (`Tensor` of shape `(B, K)`): areas (pixels) of each image's objects,
            sorted descending, zero-padded; K >= 2.
    """

    color_probs: Tensor
    shape_probs: Tensor
    position_probs: Tensor
    object_areas: Tensor

    @property
    def count(self) -> Tensor:
        """Number of objects per image, `(B,)` long."""
        return (self.object_areas > 0).sum(dim=1)


def _label_components(mask: Tensor) -> Tensor:
    """8-connected components: `(B, H, W)` long, 0 background, ids 1..M over the batch."""
    batch, height, width = mask.shape
    # float32 holds integer ids exactly up to 2^24 (65k images of 16x16).
    start = torch.arange(1, batch * height * width + 1, dtype=torch.float32).view(mask.shape)
    labels = start * mask
    while True:  # propagate the largest id through each component
        grown = F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * mask
        if torch.equal(grown, labels):
            break
        labels = grown
    # Each component's id is that of its last pixel (its root): number the roots 1..M.
    roots = mask & (labels == start)
    table = torch.zeros(batch * height * width + 1, dtype=torch.long)
    table[start[roots].long()] = torch.arange(1, int(roots.sum()) + 1)
    return table[labels.long()]


def find_objects(images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Objects of a batch.

    Args:
        images (`Tensor` of shape `(B, 3, H, W)`): in [0, 1].

    Returns:
        ``intensity`` `(B, H, W)` (brightest channel), ``labels`` `(B, H, W)` long (0 for
        background, 1..M for objects, ids unique over the batch) and ``image_of`` `(M,)`
        long (the image of each object id, id ``j`` at row ``j - 1``).
    """
    intensity = images.amax(dim=1)
    labels = _label_components(intensity > FG_THRESHOLD)
    area = torch.bincount(labels.flatten(), minlength=int(labels.max()) + 1)
    keep = area >= MIN_OBJECT_AREA
    keep[0] = False
    new_id = torch.cumsum(keep.long(), 0) * keep  # old id -> new id (0 = dropped)
    labels = new_id[labels]
    num = int(keep.sum())
    batch_of_pixel = torch.arange(images.shape[0]).view(-1, 1, 1).expand_as(labels)
    image_of = torch.zeros(num + 1, dtype=torch.long)
    image_of[labels.flatten()] = batch_of_pixel.flatten()
    return intensity, labels, image_of[1:]


def color_probs(images: Tensor, weight: Tensor) -> Tensor:
    """`(B, 4)` colour probabilities: intensity-weighted mean over pixels with ``weight`` `(B, H, W)`."""
    chroma = images / images.amax(dim=1, keepdim=True).clamp_min(1e-6)  # (B, 3, H, W)
    dist2 = ((chroma[:, None] - _PALETTE.view(1, -1, 3, 1, 1)) ** 2).sum(dim=2)  # (B, 4, H, W)
    probs = torch.softmax(-dist2 / COLOR_TEMPERATURE, dim=1)
    total = weight.sum(dim=(1, 2)).clamp_min(1e-6)
    return (probs * weight[:, None]).sum(dim=(2, 3)) / total[:, None]


def position_probs(weight: Tensor) -> Tensor:
    """`(B, 4)` probabilities of left/right/top/bottom from the centroid of ``weight`` `(B, H, W)`."""
    _, height, width = weight.shape
    total = weight.sum(dim=(1, 2)).clamp_min(1e-6)
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    dx = (weight.sum(dim=1) * xs).sum(dim=1) / total - width / 2
    dy = (weight.sum(dim=2) * ys).sum(dim=1) / total - height / 2
    sides = torch.stack([-dx, dx, -dy, dy], dim=1)  # order of POSITIONS
    return torch.softmax(sides / POSITION_TEMPERATURE, dim=1)


@lru_cache(maxsize=1)
def template_bank() -> tuple[Tensor, Tensor]:
    """Unit-norm templates `(N, WINDOW*WINDOW)` and their shape index `(N,)` (built once)."""
    steps = torch.arange(-8, 9, dtype=torch.float32) * 0.25  # centre offsets -2..2 px
    sizes = torch.arange(18, 35, dtype=torch.float32) * 0.25  # 4.5..8.5 px
    oy, ox, size = torch.meshgrid(steps, steps, sizes, indexing="ij")
    centre = WINDOW / 2
    bank, index = [], []
    for k, shape in enumerate(SHAPES):
        cover = shape_coverage(shape, centre + ox.flatten(), centre + oy.flatten(), size.flatten(),
                               WINDOW, WINDOW).flatten(1)
        bank.append(F.normalize(cover, dim=1))
        index.append(torch.full((cover.shape[0],), k))
    return torch.cat(bank), torch.cat(index)


def object_windows(intensity: Tensor, labels: Tensor, image_of: Tensor) -> Tensor:
    """Each object's `(WINDOW, WINDOW)` window centred on its centroid: `(M, WINDOW, WINDOW)`.

    Pixels of other objects are zeroed; this object's faint edge (within one pixel of it) stays.
    """
    num = image_of.shape[0]
    ids = torch.arange(1, num + 1).view(-1, 1, 1)
    own = labels[image_of] == ids  # (M, H, W)
    near = F.max_pool2d(own[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0
    others = (labels[image_of] > 0) & ~own
    values = intensity[image_of] * (near & ~others)
    mass = values.sum(dim=(1, 2)).clamp_min(1e-6)
    _, height, width = intensity.shape
    row = ((values.sum(dim=2) * torch.arange(height)).sum(dim=1) / mass).round().long()
    col = ((values.sum(dim=1) * torch.arange(width)).sum(dim=1) / mass).round().long()
    half = WINDOW // 2
    padded = F.pad(values, (half, half, half, half))
    offsets = torch.arange(WINDOW)
    rows = (row.view(-1, 1) + offsets).view(-1, WINDOW, 1)
    cols = (col.view(-1, 1) + offsets).view(-1, 1, WINDOW)
    return padded[torch.arange(num).view(-1, 1, 1), rows, cols]


def shape_misfit(windows: Tensor) -> Tensor:
    """`(M, 4)` misfit ``1 - max cos^2`` of each window against each shape's templates."""
    bank, _ = template_bank()
    flat = F.normalize(windows.flatten(1), dim=1)
    cos2 = (flat @ bank.T) ** 2  # (M, N)
    # The bank holds each shape's templates as one contiguous block of equal size.
    return 1.0 - cos2.view(flat.shape[0], len(SHAPES), -1).amax(dim=2)


def judge(images: Tensor) -> Judgement:
    """Judge a batch of images `(B, 3, H, W)` in [0, 1] (any device; computed on the CPU)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) RGB in [0, 1]; got {tuple(images.shape)}")
    images = images.detach().float().cpu().clamp(0.0, 1.0)
    batch = images.shape[0]
    intensity, labels, image_of = find_objects(images)
    weight = intensity * (labels > 0)
    colors = color_probs(images, weight)
    positions = position_probs(weight)
    shapes = torch.zeros(batch, len(SHAPES))
    areas = torch.zeros(batch, 2)
    if image_of.numel():
        misfit = shape_misfit(object_windows(intensity, labels, image_of))
        per_object = torch.softmax(-misfit / SHAPE_TEMPERATURE, dim=1)
        num = torch.bincount(image_of, minlength=batch).clamp_min(1)
        shapes = shapes.index_add(0, image_of, per_object) / num[:, None]
        object_area = torch.bincount(labels.flatten(), minlength=image_of.numel() + 1)[1:].float()
        areas = _sorted_areas(object_area, image_of, batch)
    found = (areas[:, 0] > 0).float()[:, None]
    return Judgement(colors * found, shapes, positions * found, areas)


def _sorted_areas(area: Tensor, image_of: Tensor, batch: int) -> Tensor:
    """Per image, its objects' areas sorted descending, zero-padded: `(B, max(2, K))`."""
    width = max(2, int(torch.bincount(image_of, minlength=batch).max()))
    out = torch.zeros(batch, width)
    by_area = torch.argsort(area, descending=True, stable=True)
    order = by_area[torch.argsort(image_of[by_area], stable=True)]  # by image, then area desc.
    sorted_images = image_of[order]
    first = torch.searchsorted(sorted_images, sorted_images, right=False)
    rank = torch.arange(order.numel()) - first
    out[sorted_images, rank] = area[order]
    return out


def count_scores(object_areas: Tensor, target: Tensor) -> Tensor:
    """Soft count score `(B,)` for asked counts ``target`` `(B,)` (module docstring)."""
    padded = F.pad(object_areas, (0, 1))  # a zero area after the last object
    n = target.clamp(1, padded.shape[1] - 1).view(-1, 1)
    first = padded[:, 0]
    nth = padded.gather(1, n - 1)[:, 0]
    after = padded.gather(1, n)[:, 0]
    big_enough = (2 * nth / first.clamp_min(1e-6)).clamp(max=1.0)
    alone = 1.0 - after / nth.clamp_min(1e-6)
    return torch.where(nth > 0, big_enough * alone, torch.zeros_like(first))


def _targets(scenes: Sequence[Scene]) -> dict[str, Tensor]:
    """Index of each scene's value per clause (count: the number itself), `(B,)` long each."""
    colors = list(COLORS)
    return {
        "color": torch.tensor([colors.index(s.color) for s in scenes]),
        "shape": torch.tensor([SHAPES.index(s.shape) for s in scenes]),
        "position": torch.tensor([POSITIONS.index(s.position) for s in scenes]),
        "count": torch.tensor([s.count for s in scenes]),
    }


def clause_scores(judgement: Judgement, scenes: Sequence[Scene]) -> dict[str, Tensor]:
    """Soft score in [0, 1] per clause: `{clause: (B,) float32}`."""
    target = _targets(scenes)
    pick = lambda probs, idx: probs.gather(1, idx.view(-1, 1))[:, 0]  # noqa: E731
    return {
        "color": pick(judgement.color_probs, target["color"]),
        "shape": pick(judgement.shape_probs, target["shape"]),
        "position": pick(judgement.position_probs, target["position"]),
        "count": count_scores(judgement.object_areas, target["count"]),
    }


def clause_correct(judgement: Judgement, scenes: Sequence[Scene]) -> dict[str, Tensor]:
    """Hard correctness per clause (argmax / object count equals the truth): `{clause: (B,) bool}`."""
    target = _targets(scenes)
    found = judgement.count > 0
    return {
        "color": found & (judgement.color_probs.argmax(dim=1) == target["color"]),
        "shape": found & (judgement.shape_probs.argmax(dim=1) == target["shape"]),
        "position": found & (judgement.position_probs.argmax(dim=1) == target["position"]),
        "count": judgement.count == target["count"],
    }


def _scenes(prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None) -> list[Scene]:
    meta = list(metadata) if metadata is not None else [{}] * len(prompts)
    if len(meta) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(meta)} metadata entries")
    return [scene_from_metadata(p, m) for p, m in zip(prompts, meta)]


def _check_batch(images: Tensor, prompts: Sequence[str]) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) RGB in [0, 1]; got {tuple(images.shape)}")
    if images.shape[0] != len(prompts):
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")


def _evaluate(images: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None
              ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    _check_batch(images, prompts)
    scenes = _scenes(prompts, metadata)
    judgement = judge(images)
    return clause_scores(judgement, scenes), clause_correct(judgement, scenes)


register_clause_rewards("shapes", CLAUSES, _evaluate)
