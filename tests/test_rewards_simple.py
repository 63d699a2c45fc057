"""JPEG (in)compressibility rewards (DDPO): sizes against PIL directly, flat vs noise."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from flowdppo.rewards import build_reward
from flowdppo.rewards.simple import jpeg_sizes_kb


def _flat_and_noise() -> torch.Tensor:
    flat = torch.full((3, 64, 64), 0.4)
    noise = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    return torch.stack([flat, noise])


def test_flat_image_is_more_compressible_than_noise():
    rewards, info = build_reward("jpeg_compressibility")(_flat_and_noise(), ["a", "b"], [])
    assert rewards.shape == (2,) and rewards.dtype == torch.float32 and info == {}
    assert rewards[0] > rewards[1] + 1.0  # noise costs kilobytes more than a flat image
    assert (rewards < 0).all()


def test_incompressibility_is_the_size_and_compressibility_its_negative():
    images = _flat_and_noise()
    up, _ = build_reward("jpeg_incompressibility")(images, ["a", "b"], [])
    down, _ = build_reward("jpeg_compressibility", device="cuda")(images, ["a", "b"], [])
    torch.testing.assert_close(up, -down)


@pytest.mark.parametrize("quality", [95, 50])
def test_sizes_equal_a_direct_pil_encoding(quality):
    images = _flat_and_noise()
    expected = []
    for image in images:
        array = (image.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        expected.append(len(buffer.getvalue()) / 1000)
    assert jpeg_sizes_kb(images, quality=quality).tolist() == pytest.approx(expected, abs=1e-6)


def test_grey_images_and_bad_arguments():
    grey = torch.rand(2, 1, 32, 32)
    rewards, _ = build_reward("jpeg_compressibility")(grey, ["a", "b"], [])
    expected = -jpeg_sizes_kb(grey.expand(-1, 3, -1, -1))
    torch.testing.assert_close(rewards, expected)
    with pytest.raises(ValueError, match="quality=0"):
        build_reward("jpeg_compressibility", quality=0)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        build_reward("jpeg_compressibility")(grey, ["a"], [])
