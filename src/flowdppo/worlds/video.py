"""The "video" world: tiny captioned clips of one coloured shape moving (text-to-video on a CPU).

A clip has three clauses, all named in its caption:

- colour: red, green, blue, yellow; shape: circle, square, triangle, cross (the shapes world's
  palette and renderer, `flowdppo.worlds.shapes`);
- direction: left, right, up, down: the way the object moves, at 1.5-2 px per frame.

Captions: ``"a red square moving left"`` (training phrasing) and ``"a red square that moves
left"`` (the held-out evaluation phrasing; the base model is pretrained on both, as the digits
world does with its templates). A clip is `NUM_FRAMES` frames of 16x16 RGB on black, as a
tensor of shape `(3, F, 16, 16)` in [0, 1] (channels, frames, height, width: the layout of
diffusers' video latents). Jitter: size 5.5-7 px, speed, brightness 0.8-1.0, the path's
offset across the motion (+-2.5 px) and along it (+-0.75 px). The path is centred, so the
object's position alone never tells the direction: only the motion does.

Base model: a `ToyVideoFlowModel` (frames stacked in channels, `flowdppo.models.toy_video`)
cached under ``$FLOWDPPO_CACHE``, keyed by a hash of `BASE_RECIPE`. The package ships its
weights (`ASSET_DIR`, about 1 MB), copied into the cache on first use; pretraining it again
(``flowdppo pretrain --world video --force``) takes about two CPU-minutes on one core.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..prompts import PromptItem, PromptSplits, register_prompts
from .pretrain import ensure_cached, recipe_hash
from .shapes import COLORS, IMAGE_SIZE, SHAPES, shape_coverage

logger = logging.getLogger(__name__)

NUM_FRAMES = 4
DIRECTIONS = ("left", "right", "up", "down")
CLAUSES = ("color", "shape", "direction")
# Unit vector of each direction in image coordinates (x right, y down).
DIRECTION_VECTORS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0),
                     "down": (0.0, 1.0)}
TRAIN_TEMPLATE = "a {color} {shape} moving {direction}"
EVAL_TEMPLATE = "a {color} {shape} that moves {direction}"
SPEED_RANGE = (1.5, 2.0)  # px per frame
SIZE_RANGE = (5.5, 7.0)  # px


@dataclass(frozen=True)
class Clip:
    """The ground-truth clauses of one caption."""

    color: str
    shape: str
    direction: str

    def __post_init__(self) -> None:
        for name, value, valid in (("color", self.color, tuple(COLORS)),
                                   ("shape", self.shape, SHAPES),
                                   ("direction", self.direction, DIRECTIONS)):
            if value not in valid:
                raise ValueError(f"Clip.{name}={value!r}: expected one of {list(valid)}")

    def caption(self, template: str = TRAIN_TEMPLATE) -> str:
        return template.format(color=self.color, shape=self.shape, direction=self.direction)

    def metadata(self) -> dict[str, Any]:
        return {"color": self.color, "shape": self.shape, "direction": self.direction}


_CAPTION_RE = re.compile(r"^an? (\w+) (\w+) (?:moving|that moves) (\w+)$")


def parse_caption(caption: str) -> Clip:
    """The clip a caption of either phrasing describes; ValueError for any other text."""
    match = _CAPTION_RE.match(caption.strip().lower())
    if match is None:
        raise ValueError(f"caption {caption!r} is not in the video grammar, e.g. "
                         "'a red square moving left' or 'a blue cross that moves up'")
    try:
        return Clip(*match.groups())
    except ValueError as err:
        raise ValueError(f"caption {caption!r}: {err}") from None


def clip_from_metadata(prompt: str, metadata: dict[str, Any] | None) -> Clip:
    """The clip from metadata when it names all three clauses, else parsed from the prompt."""
    if metadata and all(key in metadata for key in CLAUSES):
        return Clip(metadata["color"], metadata["shape"], metadata["direction"])
    return parse_caption(prompt)


def all_clips() -> list[Clip]:
    """Every clip of the grammar (4 x 4 x 4 = 64), in a fixed order."""
    return [Clip(c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS]


def balanced_order() -> list[Clip]:
    """All 64 clips ordered so that every block of 16 holds each (colour, shape) pair once
    and each direction four times: ``eval.max_prompts: 16`` sees the whole grammar."""
    colors = list(COLORS)
    return [Clip(colors[i], SHAPES[j], DIRECTIONS[(i + j + m) % 4])
            for m in range(4) for i in range(4) for j in range(4)]


# --- rendering ---------------------------------------------------------------------------


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def trajectory(clip: Clip, generator: torch.Generator, num_frames: int = NUM_FRAMES
               ) -> tuple[Tensor, Tensor, float]:
    """Object centres per frame ``cx, cy`` `(F,)` in pixels and its size (a straight path)."""
    size = _uniform(generator, *SIZE_RANGE)
    speed = _uniform(generator, *SPEED_RANGE)
    across = _uniform(generator, -2.5, 2.5)
    along = _uniform(generator, -0.75, 0.75)
    ux, uy = DIRECTION_VECTORS[clip.direction]
    frame = torch.arange(num_frames, dtype=torch.float32) - (num_frames - 1) / 2
    travel = along + speed * frame  # signed distance from the centre along the motion
    half = IMAGE_SIZE / 2
    cx = half + ux * travel + abs(uy) * across
    cy = half + uy * travel + abs(ux) * across
    return cx, cy, size


def render_clip(clip: Clip, generator: torch.Generator, num_frames: int = NUM_FRAMES) -> Tensor:
    """One jittered render: `(3, F, 16, 16)` float32 in [0, 1], black background."""
    cx, cy, size = trajectory(clip, generator, num_frames)
    brightness = _uniform(generator, 0.8, 1.0)
    cover = shape_coverage(clip.shape, cx, cy, torch.full_like(cx, size))  # (F, H, W)
    color = torch.tensor(COLORS[clip.color]) * brightness
    return (color.view(3, 1, 1, 1) * cover[None]).clamp(0.0, 1.0)


def render_batch(clips: list[Clip], seed: int, num_frames: int = NUM_FRAMES) -> Tensor:
    """Renders of ``clips`` (one each), `(N, 3, F, 16, 16)` in [0, 1]; same seed, same clips."""
    generator = torch.Generator().manual_seed(seed)
    if not clips:
        return torch.zeros(0, 3, num_frames, IMAGE_SIZE, IMAGE_SIZE)
    return torch.stack([render_clip(clip, generator, num_frames) for clip in clips])


def sample_dataset(num_clips: int, seed: int) -> tuple[Tensor, list[Clip]]:
    """``num_clips`` renders of clips drawn uniformly from the grammar: `(N, 3, F, 16, 16)`."""
    pool = all_clips()
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(pool), (num_clips,), generator=generator).tolist()
    clips = [pool[i] for i in picks]
    return render_batch(clips, seed + 1), clips


@register_prompts("video")
def video_prompts(**kwargs: Any) -> PromptSplits:
    """Prompt source "video": the 64 clips (`balanced_order`) in the training phrasing, and in
    the held-out one."""
    if kwargs:
        raise ValueError(f"prompt source 'video' takes no options; got {sorted(kwargs)}")
    clips = balanced_order()
    return PromptSplits([PromptItem(c.caption(TRAIN_TEMPLATE), c.metadata()) for c in clips],
                        [PromptItem(c.caption(EVAL_TEMPLATE), c.metadata()) for c in clips])


# --- base model ---------------------------------------------------------------------------

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "video_base"
BUILD_FILE = "build.json"  # the shipped weights' recipe hash, build statistics and scores

# Bump "version" (or any field) to rebuild every user's cached base model.
BASE_RECIPE: dict[str, Any] = {
    "version": 1, "world": "video",
    "model": {"sample_size": 16, "channels": 3, "num_frames": NUM_FRAMES, "num_layers": 2,
              "num_heads": 4, "head_dim": 24, "text_dim": 48, "max_length": 8, "shift": 1.0,
              "seed": 0},
    "data": {"num_clips": 8192, "seed": 0},
    # About 100 CPU-seconds on one thread (one thread also keeps it fast on a busy machine).
    # Motion is learnt late: 700 steps leave the direction at chance, 1200 solve it; 900 leave
    # the base imperfect (direction 0.80), room for RL to show.
    "train": {"num_steps": 900, "batch_size": 32, "lr": 3e-3, "seed": 0, "warmup_steps": 30,
              "time_sampling": "uniform", "num_threads": 1},
    "storage_dtype": "fp16",
}


def vocabulary() -> list[str]:
    """Every word of both phrasings, sorted (the model's vocabulary, without ``<pad>``)."""
    from ..models.toy import tokenize_words

    return sorted({w for clip in all_clips() for template in (TRAIN_TEMPLATE, EVAL_TEMPLATE)
                   for w in tokenize_words(clip.caption(template))})


def pretraining_pairs(recipe: dict[str, Any]) -> tuple[Tensor, list[str]]:
    """The recipe's clips in [-1, 1] `(N, 3, F, 16, 16)`, each captioned in a random phrasing."""
    clips_tensor, clips = sample_dataset(**recipe["data"])
    generator = torch.Generator().manual_seed(recipe["data"]["seed"] + 2)
    phrasing = torch.randint(2, (len(clips),), generator=generator).tolist()
    templates = (TRAIN_TEMPLATE, EVAL_TEMPLATE)
    return clips_tensor * 2.0 - 1.0, [c.caption(templates[k]) for c, k in zip(clips, phrasing)]


def build_video_base(directory: Path, recipe: dict[str, Any], progress: bool = True) -> dict:
    """Pretrain the video base model of ``recipe`` and save it to ``directory`` (weights in
    ``recipe["storage_dtype"]``: fp16 keeps the shipped files near 1 MB)."""
    from ..models.toy_video import ToyVideoFlowModel
    from .pretrain import pretrain_flow_model

    videos, prompts = pretraining_pairs(recipe)
    model = ToyVideoFlowModel.create(vocabulary(), **recipe["model"])
    stats = pretrain_flow_model(model, videos, prompts, progress=progress, **recipe["train"])
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[recipe["storage_dtype"]]
    model.transformer.to(dtype)
    model.text_encoder.to(dtype)
    model.save_pretrained(directory)
    logger.info("video base: %d steps in %.1f s wall (%.1f s CPU), loss %.3f -> %.3f",
                stats["num_steps"], stats["wall_s"], stats["cpu_s"], stats["loss_first"],
                stats["loss_last"])
    return stats


def shipped_base_matches(recipe: dict[str, Any]) -> bool:
    """Whether the shipped weights were built from ``recipe`` (their `BUILD_FILE` says so)."""
    record = ASSET_DIR / BUILD_FILE
    if not record.is_file():
        return False
    return json.loads(record.read_text()).get("recipe_hash") == recipe_hash(recipe)


def ensure_video_base(cache_dir: str | Path | None = None, force: bool = False,
                      progress: bool = True) -> Path:
    """Directory of the cached video base model.

    On a cache miss the shipped weights (`ASSET_DIR`, made by ``python
    scripts/make_video_base.py`` from `BASE_RECIPE`) are copied in when they were built from
    the current `BASE_RECIPE`; otherwise, or with ``force``, the base is pretrained (about two
    CPU-minutes on one core).
    """
    def build(tmp: Path) -> None:
        if not force and shipped_base_matches(BASE_RECIPE):
            shutil.copytree(ASSET_DIR, tmp, dirs_exist_ok=True)
            return
        logger.info("pretraining the video base model (once; cached in %s)", tmp.parent)
        build_video_base(tmp, BASE_RECIPE, progress=progress)

    return ensure_cached("video_base", BASE_RECIPE, build, cache_dir=cache_dir, force=force)
