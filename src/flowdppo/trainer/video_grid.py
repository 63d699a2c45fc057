"""Video sample grids: an animated GIF (PIL only, no video codec) and a frame strip for
TensorBoard (``add_image`` of a PNG: ``add_video`` would need moviepy).

Layout: one row per prompt, its samples across, each cell upscaled ``scale`` times (nearest)
with a 1-cell-pixel grey gap. The GIF plays the grid's frames; the strip shows them side by
side, time running left to right.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

GAP_VALUE = 0.3  # grey between cells and between the strip's frames


def to_uint8_frames(frames: Tensor) -> np.ndarray:
    """`(F, C, H, W)` float in [0, 1] (C = 1 or 3) -> `(F, H, W, 3)` uint8, rounded."""
    if frames.ndim != 4 or frames.shape[1] not in (1, 3):
        raise ValueError(f"frames must be (F, C, H, W) with C = 1 or 3; got {tuple(frames.shape)}")
    frames = frames.detach().float().cpu().clamp(0.0, 1.0).expand(-1, 3, -1, -1)
    return (frames * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_gif(frames: Tensor, path: str | Path, duration_ms: int = 250) -> Path:
    """Write frames `(F, C, H, W)` in [0, 1] as a looping GIF.

    Each frame gets its own adaptive palette (exact when a frame has at most 256 colours,
    as toy clips do). PIL merges identical consecutive frames into one longer frame.
    """
    from PIL import Image

    if duration_ms <= 0:
        raise ValueError(f"duration_ms={duration_ms}: expected a positive frame time")
    images = [Image.fromarray(np.ascontiguousarray(a)) for a in to_uint8_frames(frames)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0,
                   optimize=False, disposal=1)
    return path


def read_gif(path: str | Path) -> Tensor:
    """The frames of a GIF as `(F, 3, H, W)` float32 in [0, 1] (the inverse of `write_gif`)."""
    from PIL import Image, ImageSequence

    with Image.open(path) as image:
        frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(image)]
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0


def tile_videos(videos: Tensor, rows: int, cols: int, scale: int = 4) -> Tensor:
    """Videos `(rows * cols, C, F, H, W)` tiled into grid frames `(F, C, H', W')`, row-major."""
    count, channels, frames, height, width = videos.shape
    if count != rows * cols:
        raise ValueError(f"{count} videos for a {rows} x {cols} grid")
    cells = videos.float().repeat_interleave(scale, dim=3).repeat_interleave(scale, dim=4)
    cell_h, cell_w = height * scale + 1, width * scale + 1
    grid = torch.full((frames, channels, rows * cell_h + 1, cols * cell_w + 1), GAP_VALUE)
    for i in range(count):
        top, left = (i // cols) * cell_h + 1, (i % cols) * cell_w + 1
        grid[:, :, top:top + height * scale, left:left + width * scale] = cells[i].transpose(0, 1)
    return grid


def frame_strip(frames: Tensor) -> Tensor:
    """Frames `(F, C, H, W)` side by side, 2-pixel gaps: `(C, H, F * (W + 2) - 2)`."""
    gap = torch.full((frames.shape[1], frames.shape[2], 2), GAP_VALUE)
    parts = []
    for f in range(frames.shape[0]):
        parts += [frames[f], gap] if f < frames.shape[0] - 1 else [frames[f]]
    return torch.cat(parts, dim=2)


def save_video_grid(result: Any, path: Path, reward_name: str, max_rows: int = 8,
                    max_cols: int = 4, samples_per_prompt: int = 1, scale: int = 4) -> Path:
    """The evaluation's videos as ``path`` with suffix ``.gif`` (animated grid) and ``path``
    itself as a PNG frame strip (what the trainer logs to TensorBoard); returns the PNG path.

    ``result`` is an `EvalResult` with ``images`` `(N, C, F, H, W)`; the prompts of the rows
    and each cell's ``reward_name`` score go to ``<path>.txt`` beside them.
    """
    from PIL import Image

    per = max(samples_per_prompt, 1)
    rows, cols = min(max_rows, len(result.prompts) // per), min(max_cols, per)
    if rows < 1:
        raise ValueError(f"save_video_grid: {len(result.prompts)} videos, fewer than one row "
                         f"of {per}")
    index = [r * per + c for r in range(rows) for c in range(cols)]
    grid = tile_videos(result.images[index], rows, cols, scale)
    write_gif(grid, Path(path).with_suffix(".gif"))
    strip = to_uint8_frames(frame_strip(grid)[None])[0]
    path = Path(path)
    Image.fromarray(strip).save(path)
    scores = result.rewards[reward_name]
    lines = [f"{result.prompts[r * per]}: " + " ".join(f"{float(scores[r * per + c]):.2f}"
                                                       for c in range(cols)) for r in range(rows)]
    path.with_suffix(".txt").write_text(f"{reward_name} per sample, one row per prompt\n"
                                        + "\n".join(lines) + "\n")
    return path
