"""Video sample grids: the GIF writer round-trips frames exactly; the grid and strip layout."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from flowdppo.trainer.evaluation import EvalResult, save_grid
from flowdppo.trainer.video_grid import frame_strip, read_gif, tile_videos, write_gif


def _palette_frames(num_frames: int = 5) -> torch.Tensor:
    """Distinct frames of few exact colours (multiples of 1/255), `(F, 3, 6, 7)`."""
    generator = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 4, (num_frames, 3, 6, 7), generator=generator).float() * 85 / 255
    levels[:, :, 0, 0] = torch.arange(num_frames).view(-1, 1) / 255  # no two frames alike
    return levels


def test_gif_round_trips_frames_exactly(tmp_path):
    frames = _palette_frames()
    path = write_gif(frames, tmp_path / "sub" / "clip.gif", duration_ms=100)
    back = read_gif(path)
    assert back.shape == frames.shape
    assert torch.equal((back * 255).round(), (frames * 255).round())
    with Image.open(path) as image:
        assert image.n_frames == 5 and image.info["duration"] == 100 and image.info["loop"] == 0


def test_gif_grey_frames_and_bad_input(tmp_path):
    grey = _palette_frames(3)[:, :1]
    back = read_gif(write_gif(grey, tmp_path / "grey.gif"))
    assert torch.equal((back * 255).round(), (grey.expand(-1, 3, -1, -1) * 255).round())
    with pytest.raises(ValueError, match=r"\(F, C, H, W\)"):
        write_gif(torch.zeros(3, 2, 4, 4), tmp_path / "bad.gif")
    with pytest.raises(ValueError, match="duration_ms=0"):
        write_gif(grey, tmp_path / "bad.gif", duration_ms=0)


def test_tile_places_each_video_and_strip_lays_frames_across():
    videos = torch.zeros(6, 3, 2, 4, 4)
    videos[4, :, 1] = 1.0  # row 1, column 1 of a 2 x 3 grid, second frame only
    grid = tile_videos(videos, rows=2, cols=3, scale=2)
    assert grid.shape == (2, 3, 2 * 9 + 1, 3 * 9 + 1)
    cell = grid[1, :, 10:18, 10:18]
    assert torch.equal(cell, torch.ones_like(cell)) and float(grid[0, :, 10:18, 10:18].max()) == 0
    strip = frame_strip(grid)
    assert strip.shape == (3, 19, 2 * 28 + 2)
    assert torch.equal(strip[:, :, 30:], grid[1])
    with pytest.raises(ValueError, match="6 videos for a 2 x 2 grid"):
        tile_videos(videos, 2, 2)


def test_save_grid_writes_gif_strip_and_scores_for_videos(tmp_path):
    videos = torch.rand(8, 3, 4, 16, 16)
    prompts = [f"prompt {i // 2}" for i in range(8)]
    result = EvalResult(videos, prompts, {"r": torch.arange(8.0)}, {})
    png = save_grid(result, tmp_path / "samples" / "eval_step_000001.png", "r",
                    samples_per_prompt=2)
    assert png.suffix == ".png" and png.is_file()
    gif = read_gif(png.with_suffix(".gif"))
    assert gif.shape == (4, 3, 4 * 65 + 1, 2 * 65 + 1)
    with Image.open(png) as strip:
        assert strip.size == (4 * (2 * 65 + 1 + 2) - 2, 4 * 65 + 1)
    text = png.with_suffix(".txt").read_text().splitlines()
    assert text[1] == "prompt 0: 0.00 1.00" and text[4] == "prompt 3: 6.00 7.00"
