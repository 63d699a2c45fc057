"""The rule-based judge of the video world and its rewards (one per clause, and their mean).

The judge has no learned weights and never sees the caption until scoring:

1. Per frame, the shapes world's judge (`flowdppo.worlds.shapes_rewards.judge`) finds the
   objects and gives colour and shape probabilities (zeros on a frame with no object).
   A clip's colour and shape probabilities are the means over its frames, so an object that
   vanishes, flickers to another colour or changes shape mid-clip loses score.
2. Motion: the intensity-weighted centroid of each frame's objects; the velocity ``(vx, vy)``
   (px per frame) is the least-squares slope of the centroids over the frames that hold an
   object (fewer than two such frames: no motion is found). Direction probabilities are the
   softmax of ``(-vx, vx, -vy, vy, STILL_SPEED) / DIRECTION_TEMPERATURE`` over left, right,
   up, down and "still": an object slower than `STILL_SPEED` along every axis is still.

Soft clause scores are the probabilities of the asked value, in [0, 1]; hard predictions are
the argmax (nothing found is never right; "still" is never a right answer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..rewards.video import video_frames
from . import shapes_rewards
from .clause_rewards import register_clause_rewards
from .shapes import COLORS, SHAPES
from .video import CLAUSES, DIRECTIONS, Clip, clip_from_metadata

STILL_SPEED = 0.5  # px per frame
DIRECTION_TEMPERATURE = 0.25  # px per frame


@dataclass(frozen=True)
class VideoJudgement:
    """What the judge sees in a batch of B clips of F frames.

    Attributes:
        color_probs, shape_probs (`Tensor` of shape `(B, 4)`): over `COLORS`, `SHAPES`,
            averaged over frames (a frame without an object counts as zeros).
        direction_probs (`Tensor` of shape `(B, 5)`): over `DIRECTIONS` and "still" (zeros
            where fewer than two frames hold an object).
        velocity (`Tensor` of shape `(B, 2)`): ``(vx, vy)`` in px per frame.
        found (`Tensor` of shape `(B, F)`, bool): frames holding an object.
    """

    color_probs: Tensor
    shape_probs: Tensor
    direction_probs: Tensor
    velocity: Tensor
    found: Tensor


def centroids(frames: Tensor) -> tuple[Tensor, Tensor]:
    """Intensity-weighted centroid ``(x, y)`` `(N, 2)` of each frame's objects, and `(N,)` found."""
    intensity, labels, _ = shapes_rewards.find_objects(frames)
    weight = intensity * (labels > 0)
    mass = weight.sum(dim=(1, 2))
    _, height, width = weight.shape
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    x = (weight.sum(dim=1) * xs).sum(dim=1) / mass.clamp_min(1e-6)
    y = (weight.sum(dim=2) * ys).sum(dim=1) / mass.clamp_min(1e-6)
    return torch.stack([x, y], dim=1), mass > 0


def fit_velocity(points: Tensor, found: Tensor) -> tuple[Tensor, Tensor]:
    """Least-squares slope of ``points`` `(B, F, 2)` over frames, using ``found`` `(B, F)` only.

    Returns:
        velocity `(B, 2)` (zero where fewer than two frames are found) and `(B,)` bool ``moving_known``.
    """
    w = found.float()
    frame = torch.arange(points.shape[1], dtype=torch.float32).expand_as(w)
    count = w.sum(dim=1).clamp_min(1.0)
    f_mean = (w * frame).sum(dim=1) / count
    p_mean = (w[..., None] * points).sum(dim=1) / count[:, None]
    df = (frame - f_mean[:, None]) * w  # (B, F)
    denom = (df * df).sum(dim=1)
    known = w.sum(dim=1) >= 2
    slope = (df[..., None] * (points - p_mean[:, None])).sum(dim=1) / denom.clamp_min(1e-6)[:, None]
    return slope * known[:, None], known


def judge(clips: Tensor) -> VideoJudgement:
    """Judge clips `(B, 3, F, H, W)` in [0, 1] (any device; computed on the CPU)."""
    if clips.ndim != 5 or clips.shape[1] != 3:
        raise ValueError(f"clips must be (B, 3, F, H, W) RGB in [0, 1]; got {tuple(clips.shape)}")
    clips = clips.detach().float().cpu().clamp(0.0, 1.0)
    batch, frames = clips.shape[0], clips.shape[2]
    flat = video_frames(clips)
    per_frame = shapes_rewards.judge(flat)
    color = per_frame.color_probs.view(batch, frames, -1).mean(dim=1)
    shape = per_frame.shape_probs.view(batch, frames, -1).mean(dim=1)
    points, found = centroids(flat)
    found = found.view(batch, frames)
    velocity, known = fit_velocity(points.view(batch, frames, 2), found)
    vx, vy = velocity.unbind(dim=1)
    logits = torch.stack([-vx, vx, -vy, vy, torch.full_like(vx, STILL_SPEED)], dim=1)
    direction = torch.softmax(logits / DIRECTION_TEMPERATURE, dim=1) * known[:, None]
    return VideoJudgement(color, shape, direction, velocity, found)


def _targets(clips: Sequence[Clip]) -> dict[str, Tensor]:
    colors = list(COLORS)
    return {"color": torch.tensor([colors.index(c.color) for c in clips]),
            "shape": torch.tensor([SHAPES.index(c.shape) for c in clips]),
            "direction": torch.tensor([DIRECTIONS.index(c.direction) for c in clips])}


def _probs(judgement: VideoJudgement) -> dict[str, Tensor]:
    return {"color": judgement.color_probs, "shape": judgement.shape_probs,
            "direction": judgement.direction_probs}


def clause_scores(judgement: VideoJudgement, clips: Sequence[Clip]) -> dict[str, Tensor]:
    """Soft score in [0, 1] per clause: `{clause: (B,) float32}`."""
    target, probs = _targets(clips), _probs(judgement)
    return {c: probs[c].gather(1, target[c].view(-1, 1))[:, 0] for c in CLAUSES}


def clause_correct(judgement: VideoJudgement, clips: Sequence[Clip]) -> dict[str, Tensor]:
    """Hard correctness per clause (argmax equals the truth): `{clause: (B,) bool}`."""
    target, probs = _targets(clips), _probs(judgement)
    # All-zero probabilities (nothing found) are never right, whatever their argmax.
    return {c: (probs[c].sum(dim=1) > 0) & (probs[c].argmax(dim=1) == target[c]) for c in CLAUSES}


def _evaluate(clips: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None
              ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    if clips.ndim != 5 or clips.shape[0] != len(prompts):
        raise ValueError(f"video judge: clips must be (B, 3, F, H, W) with one prompt each; got "
                         f"{tuple(clips.shape)} for {len(prompts)} prompts")
    meta = list(metadata) if metadata else [{}] * len(prompts)
    if len(meta) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(meta)} metadata entries")
    targets = [clip_from_metadata(p, m) for p, m in zip(prompts, meta)]
    judgement = judge(clips)
    return clause_scores(judgement, targets), clause_correct(judgement, targets)


register_clause_rewards("video", CLAUSES, _evaluate)
