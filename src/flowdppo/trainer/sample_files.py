"""What ``flowdppo sample`` writes: one PNG per image, a captioned grid, a JSONL manifest.

Layout of ``--out DIR``::

    p00_s0042.png ...     # prompt 0, seed 42 (8-bit RGB, or grey for one-channel images)
    grid.png              # one row per prompt (its text above), each image captioned with
                          # its seed and, with --reward, its score
    samples.jsonl         # {"file", "prompt", "seed", "steps", "guidance_scale", "reward"...}
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

_CAPTION = 14  # pixels per caption line under each image
_HEADER = 14  # pixels per line of prompt text above each row
_MIN_CELL = 128  # small images (toy digits) are upscaled so captions fit


@dataclass(frozen=True)
class SampleSheet:
    """Images and what made them; ``rewards`` maps a reward name to one score per image."""

    images: Tensor  # (N, C, H, W) in [0, 1]
    prompts: list[str]  # (N,)
    seeds: list[int]  # (N,)
    num_steps: int
    guidance_scale: float
    rewards: dict[str, list[float]]


def to_pil(image: Tensor):
    """`(C, H, W)` float in [0, 1] as an 8-bit PIL image, rounded as diffusers' ``numpy_to_pil``."""
    from PIL import Image

    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def write_samples(sheet: SampleSheet, out_dir: Path) -> list[Path]:
    """Write the PNGs, ``grid.png`` and ``samples.jsonl`` under ``out_dir``; returns the PNGs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    order = list(dict.fromkeys(sheet.prompts))
    files, rows = [], []
    for i, (prompt, seed) in enumerate(zip(sheet.prompts, sheet.seeds)):
        path = out_dir / f"p{order.index(prompt):02d}_s{seed:04d}.png"
        to_pil(sheet.images[i]).save(path)
        files.append(path)
        row = {"file": path.name, "prompt": prompt, "seed": seed, "steps": sheet.num_steps,
               "guidance_scale": sheet.guidance_scale}
        row.update({f"reward_{name}": values[i] for name, values in sheet.rewards.items()})
        rows.append(row)
    (out_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_grid(sheet, order, out_dir / "grid.png")
    return files


def _caption(sheet: SampleSheet, i: int, width: int) -> list[str]:
    """Seed, then one line per reward, each cut to ``width`` characters."""
    lines = [f"seed {sheet.seeds[i]}"]
    for name, values in sheet.rewards.items():
        score = f" {values[i]:.3f}"
        lines.append(name[: max(1, width - len(score))] + score)
    return lines


def write_grid(sheet: SampleSheet, order: Sequence[str], path: Path) -> Path:
    """One row per prompt (wrapped text above it), its images across, captions below each."""
    from PIL import Image, ImageDraw

    cells = [to_pil(image).convert("RGB") for image in sheet.images]
    width, height = cells[0].size
    scale = max(1, -(-_MIN_CELL // width))  # ceil: upscale tiny images for readable captions
    cell_w, cell_h = width * scale, height * scale
    per_row = [[i for i, p in enumerate(sheet.prompts) if p == prompt] for prompt in order]
    cols = max(len(r) for r in per_row)
    wrap = max(16, cols * cell_w // 7)  # ~7 px per character of PIL's default font
    headers = [textwrap.wrap(prompt, wrap)[:3] or [""] for prompt in order]
    caption_h = _CAPTION * (1 + len(sheet.rewards))
    total_h = sum(len(h) * _HEADER + cell_h + caption_h for h in headers)
    grid = Image.new("RGB", (cols * cell_w, total_h), "white")
    draw = ImageDraw.Draw(grid)
    y = 0
    for header, indices in zip(headers, per_row):
        for k, line in enumerate(header):
            draw.text((2, y + k * _HEADER), line, fill="black")
        y += len(header) * _HEADER
        for c, i in enumerate(indices):
            grid.paste(cells[i].resize((cell_w, cell_h), Image.NEAREST), (c * cell_w, y))
            for k, line in enumerate(_caption(sheet, i, cell_w // 7)):
                draw.text((c * cell_w + 2, y + cell_h + 1 + k * _CAPTION), line, fill="black")
        y += cell_h + caption_h
    grid.save(path)
    return path
