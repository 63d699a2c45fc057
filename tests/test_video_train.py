"""The toy video model and video RL end to end: 5-D latents `(B, C, F, H, W)` through the
rollout, replay, losses and evaluation, on a tiny random base (seconds)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fast_runs import tiny_overrides
from flowdppo.models.toy_video import ToyVideoFlowModel
from flowdppo.worlds import video


@pytest.fixture(scope="module")
def tiny_video_base(tmp_path_factory):
    """A random 1-block toy video model with the video vocabulary, saved like a base."""
    directory = tmp_path_factory.mktemp("tiny_video_base")
    model = ToyVideoFlowModel.create(video.vocabulary(), num_frames=video.NUM_FRAMES,
                                     sample_size=16, num_layers=1, num_heads=2, head_dim=16,
                                     text_dim=32, max_length=8, seed=0)
    model.save_pretrained(directory)
    return directory


def test_video_model_shapes_save_load_and_errors(tiny_video_base):
    model = ToyVideoFlowModel.from_pretrained(tiny_video_base)
    assert model.latent_shape == (3, video.NUM_FRAMES, 16, 16) and model.image_channels == 3
    x = model.initial_noise(2, torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, video.NUM_FRAMES, 16, 16)
    cond = model.encode_prompts(["a red square moving left", "a blue cross that moves up"])
    t = torch.tensor([0.7, 0.3])
    v = model.predict_velocity(x, t, cond)
    assert v.shape == x.shape and v.dtype == torch.float32
    # One joint model over the clip: changing frame 0 changes the velocity of the others.
    x2 = x.clone()
    x2[:, :, 0] += 1.0
    assert not torch.allclose(model.predict_velocity(x2, t, cond)[:, :, 1:], v[:, :, 1:])
    assert model.decode(x).shape == x.shape
    with pytest.raises(ValueError, match=r"expected \(B, 3, 4, 16, 16\)"):
        model.predict_velocity(x[:, :, 0], t, cond)
    with pytest.raises(ValueError, match="not a toy video model"):
        ToyVideoFlowModel.from_pretrained(tiny_video_base / "transformer")


def test_pretraining_loss_runs_on_clips(tiny_video_base):
    from flowdppo.worlds.pretrain import pretrain_flow_model

    model = ToyVideoFlowModel.from_pretrained(tiny_video_base)
    clips, prompts = video.pretraining_pairs({**video.BASE_RECIPE,
                                              "data": {"num_clips": 32, "seed": 0}})
    stats = pretrain_flow_model(model, clips, prompts, num_steps=3, batch_size=8, lr=1e-3, seed=0,
                                warmup_steps=1, progress=False)
    assert math.isfinite(stats["loss_last"])
    with pytest.raises(ValueError, match="images have shape"):
        pretrain_flow_model(model, clips[:, :, 0], prompts, num_steps=1, batch_size=2, lr=1e-3,
                            seed=0, progress=False)


def test_flowdppo_train_runs_video_rl_end_to_end(tiny_video_base, tmp_path):
    from flowdppo.cli import main

    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_video_base)
    code = main(["train", "--config", "toy_video_dppo", "--output-dir", str(out), *overrides])
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("reward_mean", "reward_video_clauses", "loss", "kl_old_new_mean", "grad_norm"):
            assert math.isfinite(row[key]), (key, row[key])
    assert rows[0]["ratio_min"] <= 1.0 <= rows[0]["ratio_max"]
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    last = evals[-1]
    for key in ("reward_mean", "video_acc_all", "temporal_consistency", "diversity",
                "video_per_frame_mean", "kl_ref"):
        assert math.isfinite(last[key]), key
    samples = out / "samples"
    assert list(samples.glob("eval_step_*.gif")) and list(samples.glob("eval_step_*.png"))
    assert list((out / "tensorboard").glob("events.*"))
    assert (out / "checkpoints").is_dir()


@pytest.mark.slow
def test_compare_benchmark_video_runs(tiny_video_base, tmp_path):
    from flowdppo.cli import main

    sets = []
    for item in tiny_overrides(tiny_video_base, iterations=1):
        if not item.startswith(("train.num_iterations", "logging", "device")):
            sets += ["--set", item]
    code = main(["compare", "--benchmark", "video", "--quick", "--methods", "dppo,nft",
                 "--variants", "main", "--iterations", "1", "--jobs", "1",
                 "--output-dir", str(tmp_path), "--device", "cpu", *sets])
    assert code == 0
    payload = json.loads((tmp_path / "compare.json").read_text())
    assert set(payload["variants"]["main"]["methods"]) == {"dppo", "nft"}
    assert "| dppo |" in (tmp_path / "compare.md").read_text()
