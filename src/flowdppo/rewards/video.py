"""Video rewards and monitors built from image ones: per-frame scores aggregated over frames,
and temporal consistency.

Videos are `Tensor` of shape `(B, C, F, H, W)` in [0, 1] (channels, frames, height, width).

``video_per_frame``: any registered image reward (CLIPScore, PickScore, aesthetic, JPEG, a
world's judge...) scores each of the F frames with the clip's prompt and metadata; the clip's
reward is the mean over frames (``aggregate: mean``) or the worst frame (``aggregate: min``,
which a single bad frame cannot hide behind good ones).

``temporal_consistency`` (monitor): the similarity of consecutive frames' features,
``s(a, b) = 1 - ||a - b||^2 / (||a||^2 + ||b||^2 + 1e-8)`` with ``a``, ``b`` a frame average-
pooled by ``pool`` pixels and centred on its own mean (a tiny pixel feature: 1 for identical
frames, blank ones included, about 0 for unrelated frames, -1 for a negated one). Pooling
makes it tolerant of smooth motion (a shift of a pixel or two barely lowers it) while flicker,
a vanishing object or one changing colour lowers it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Monitor, Reward, RewardOutput, build_reward, register_monitor, register_reward

AGGREGATES = ("mean", "min")


def check_videos(videos: Tensor, prompts: Sequence[str], *, name: str) -> None:
    """`ValueError` unless ``videos`` is `(B, C, F, H, W)` with one prompt per video."""
    if not isinstance(videos, Tensor) or videos.ndim != 5:
        shape = tuple(videos.shape) if isinstance(videos, Tensor) else type(videos).__name__
        raise ValueError(f"{name}: videos must be a (B, C, F, H, W) tensor, got {shape}; an "
                         "image model's (B, C, H, W) samples need an image reward instead")
    if len(prompts) != videos.shape[0]:
        raise ValueError(f"{name}: {videos.shape[0]} videos but {len(prompts)} prompts")


def video_frames(videos: Tensor) -> Tensor:
    """`(B, C, F, H, W)` -> `(B * F, C, H, W)`, video-major (frame ``f`` of video ``b`` at ``b*F + f``)."""
    batch, channels, frames, height, width = videos.shape
    return videos.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)


def aggregate_frames(per_frame: Tensor, how: str) -> Tensor:
    """`(B, F)` frame scores -> `(B,)`: their mean or their minimum."""
    if how == "mean":
        return per_frame.mean(dim=1)
    if how == "min":
        return per_frame.min(dim=1).values
    raise ValueError(f"aggregate={how!r}: expected one of {list(AGGREGATES)}")


@dataclass(frozen=True)
class PerFrameReward:
    """An image reward applied to every frame, aggregated over frames.

    ``info`` holds ``per_frame`` `(B, F)`; the inner reward's info is dropped (its per-image
    entries would be per frame).
    """

    name: str
    inner: Reward
    aggregate: str = "mean"

    def __call__(self, videos: Tensor, prompts: Sequence[str],
                 metadata: Sequence[dict[str, Any]]) -> RewardOutput:
        check_videos(videos, prompts, name=self.name)
        batch, frames = videos.shape[0], videos.shape[2]
        meta = list(metadata) if metadata else [{} for _ in prompts]
        values, _ = self.inner(video_frames(videos), [p for p in prompts for _ in range(frames)],
                               [m for m in meta for _ in range(frames)])
        per_frame = torch.as_tensor(values).detach().to("cpu", torch.float32).reshape(batch, frames)
        return aggregate_frames(per_frame, self.aggregate), {"per_frame": per_frame}


@register_reward("video_per_frame")
def video_per_frame(reward: str, aggregate: str = "mean", reward_kwargs: dict | None = None,
                    device: str = "cpu") -> Reward:
    """The image reward ``reward`` (with ``reward_kwargs``) on each frame, aggregated by
    ``aggregate`` (``mean`` or ``min``); ``device`` is passed on to the inner reward."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"video_per_frame: aggregate={aggregate!r}; expected one of "
                         f"{list(AGGREGATES)}")
    if reward == "video_per_frame":
        raise ValueError("video_per_frame: `reward` must name an image reward, not itself")
    inner = build_reward(reward, **{"device": device, **(reward_kwargs or {})})
    return PerFrameReward(f"video_per_frame({reward})", inner, aggregate)


def frame_similarity(videos: Tensor, pool: int = 4) -> Tensor:
    """Consecutive-frame similarity (module docstring) `(B, F - 1)`, float32 in [-1, 1].

    Args:
        videos (`Tensor` of shape `(B, C, F, H, W)`): any range.
        pool (`int`): average-pooling window in pixels (1: raw pixels); H and W need not divide.
    """
    if pool < 1:
        raise ValueError(f"pool={pool}: expected a window of at least 1 pixel")
    batch, frames = videos.shape[0], videos.shape[2]
    flat = video_frames(videos.detach().float().cpu())
    if pool > 1:
        flat = F.avg_pool2d(flat, pool, ceil_mode=True)
    feats = flat.reshape(batch, frames, -1)
    feats = feats - feats.mean(dim=2, keepdim=True)
    a, b = feats[:, :-1], feats[:, 1:]
    num = (a - b).pow(2).sum(dim=2)
    return 1.0 - num / (a.pow(2).sum(dim=2) + b.pow(2).sum(dim=2) + 1e-8)


@register_monitor("temporal_consistency")
def temporal_consistency(pool: int = 4, device: str = "cpu") -> Monitor:
    """``temporal_consistency`` (mean over videos and consecutive frame pairs) and
    ``temporal_consistency_min`` (mean over videos of the worst pair); ``device`` unused."""
    del device

    def monitor(videos: Tensor, prompts: Sequence[str],
                metadata: Sequence[dict[str, Any]]) -> dict[str, float]:
        check_videos(videos, prompts, name="temporal_consistency")
        if videos.shape[2] < 2:
            raise ValueError(f"temporal_consistency needs at least 2 frames; got {videos.shape[2]}")
        sim = frame_similarity(videos, pool)
        return {"temporal_consistency": float(sim.mean()),
                "temporal_consistency_min": float(sim.min(dim=1).values.mean())}

    return monitor
