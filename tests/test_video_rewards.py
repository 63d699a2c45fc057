"""Video rewards: per-frame image rewards aggregated over frames (mean / min against a hand
case), and the temporal-consistency monitor."""

from __future__ import annotations

import pytest
import torch

from flowdppo.rewards import REWARDS, build_monitor, build_reward, register_reward
from flowdppo.rewards.video import aggregate_frames, frame_similarity, video_frames

CALLS: list[tuple[list[str], list[dict]]] = []


def _brightness_factory(offset: float = 0.0, device: str = "cpu"):
    """A test image reward: mean pixel value (+ offset); records what it was called with."""
    def reward(images, prompts, metadata):
        assert images.ndim == 4
        CALLS.append((list(prompts), list(metadata)))
        return images.mean(dim=(1, 2, 3)) + offset, {}

    return reward


if "test_brightness" not in REWARDS:
    register_reward("test_brightness")(_brightness_factory)


def _hand_videos() -> torch.Tensor:
    """Two videos of 3 frames (1 channel, 2x2): frame values known by hand."""
    levels = torch.tensor([[0.2, 0.8, 0.5], [1.0, 0.1, 0.4]])  # (B, F)
    return levels.view(2, 1, 3, 1, 1).expand(2, 1, 3, 2, 2).clone()


def test_video_frames_order_is_video_major():
    videos = torch.arange(2 * 3 * 4 * 1 * 1, dtype=torch.float32).view(2, 3, 4, 1, 1)
    frames = video_frames(videos)
    assert frames.shape == (8, 3, 1, 1)
    assert torch.equal(frames[5], videos[1, :, 1])  # video 1, frame 1


def test_aggregate_frames_mean_and_min():
    per_frame = torch.tensor([[0.2, 0.8, 0.5], [1.0, 0.1, 0.4]])
    assert torch.allclose(aggregate_frames(per_frame, "mean"), torch.tensor([0.5, 0.5]))
    assert torch.equal(aggregate_frames(per_frame, "min"), torch.tensor([0.2, 0.1]))
    with pytest.raises(ValueError, match="aggregate='max'"):
        aggregate_frames(per_frame, "max")


def test_per_frame_reward_against_a_hand_case():
    CALLS.clear()
    videos = _hand_videos()
    meta = [{"k": 0}, {"k": 1}]
    mean = build_reward("video_per_frame", reward="test_brightness")
    values, info = mean(videos, ["p", "q"], meta)
    assert torch.allclose(values, torch.tensor([0.5, 0.5]))
    assert torch.allclose(info["per_frame"], torch.tensor([[0.2, 0.8, 0.5], [1.0, 0.1, 0.4]]))
    # Each frame is scored with its own video's prompt and metadata.
    assert CALLS[-1] == (["p"] * 3 + ["q"] * 3, [{"k": 0}] * 3 + [{"k": 1}] * 3)
    worst = build_reward("video_per_frame", reward="test_brightness", aggregate="min",
                         reward_kwargs={"offset": 1.0})
    values, _ = worst(videos, ["p", "q"], meta)
    assert torch.allclose(values, torch.tensor([1.2, 1.1]))


def test_per_frame_reward_wraps_a_builtin_and_rejects_bad_input():
    videos = torch.rand(2, 3, 4, 16, 16)
    jpeg = build_reward("video_per_frame", reward="jpeg_compressibility", aggregate="min")
    values, info = jpeg(videos, ["a", "b"], [{}, {}])
    assert values.shape == (2,) and torch.equal(values, info["per_frame"].min(dim=1).values)
    with pytest.raises(ValueError, match=r"\(B, C, F, H, W\)"):
        jpeg(videos[:, :, 0], ["a", "b"], [{}, {}])
    with pytest.raises(ValueError, match="2 videos but 1 prompts"):
        jpeg(videos, ["a"], [{}])
    with pytest.raises(ValueError, match="aggregate='median'"):
        build_reward("video_per_frame", reward="jpeg_compressibility", aggregate="median")
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        build_reward("video_per_frame", reward="nope")


def test_frame_similarity_hand_cases():
    torch.manual_seed(0)
    frame = torch.rand(3, 16, 16)
    same = frame[:, None].expand(3, 4, 16, 16)[None]
    assert torch.allclose(frame_similarity(same), torch.ones(1, 3), atol=1e-6)
    blank = torch.zeros(1, 3, 4, 16, 16)
    assert torch.allclose(frame_similarity(blank), torch.ones(1, 3))
    flipped = torch.stack([frame, 1 - frame], dim=1)[None]  # centred: the negative frame
    assert frame_similarity(flipped, pool=1).item() == pytest.approx(-1.0, abs=1e-5)
    noise = torch.rand(8, 3, 6, 16, 16)
    assert abs(float(frame_similarity(noise, pool=1).mean())) < 0.05
    with pytest.raises(ValueError, match="pool=0"):
        frame_similarity(same, pool=0)


def test_temporal_monitor_prefers_smooth_motion_to_flicker():
    from flowdppo.worlds.video import Clip, render_batch

    clips = render_batch([Clip("red", "square", "left"), Clip("blue", "circle", "up")], seed=0)
    flicker = clips.clone()
    flicker[:, :, 1::2] = flicker[:, :, 1::2].roll(1, dims=1)  # odd frames change colour
    monitor = build_monitor("temporal_consistency")
    smooth = monitor(clips, ["a", "b"], [{}, {}])
    bad = monitor(flicker, ["a", "b"], [{}, {}])
    assert set(smooth) == {"temporal_consistency", "temporal_consistency_min"}
    assert smooth["temporal_consistency"] > 0.5
    assert bad["temporal_consistency"] < smooth["temporal_consistency"] - 0.3
    assert smooth["temporal_consistency_min"] <= smooth["temporal_consistency"]
    with pytest.raises(ValueError, match="at least 2 frames"):
        monitor(clips[:, :, :1], ["a", "b"], [{}, {}])
