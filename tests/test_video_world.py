"""The video world: renderer, grammar, prompts, the judge (each clause can be judged false,
accuracy >= 0.98 on fresh renders), its rewards and monitor, and the pretrain command."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flowdppo.prompts import build_prompts
from flowdppo.rewards import build_monitor, build_reward
from flowdppo.worlds import video
from flowdppo.worlds import video_rewards as judge_mod
from flowdppo.worlds.shapes import COLORS, SHAPES
from flowdppo.worlds.video import CLAUSES, DIRECTIONS, Clip, parse_caption, render_batch

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
WRONG = {  # a clip differing from ``c`` in exactly one clause
    "color": lambda c: dataclasses.replace(c, color=list(COLORS)[(list(COLORS).index(c.color) + 1) % 4]),
    "shape": lambda c: dataclasses.replace(c, shape=SHAPES[(SHAPES.index(c.shape) + 1) % 4]),
    "direction": lambda c: dataclasses.replace(c, direction=OPPOSITE[c.direction]),
}


def _judged(clips_tensor, clips):
    return judge_mod._evaluate(clips_tensor, [c.caption() for c in clips], None)


def test_render_shape_range_determinism_and_motion():
    clips = video.all_clips()[:8]
    a = render_batch(clips, seed=3)
    assert a.shape == (8, 3, video.NUM_FRAMES, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, render_batch(clips, seed=3))
    assert not torch.equal(a, render_batch(clips, seed=4))
    assert float(a.min()) >= 0.0 and 0.7 < float(a.max()) <= 1.0
    # The frames differ (the object moves) and a red clip has no green or blue.
    red = render_batch([Clip("red", "square", "left")], seed=0)[0]
    assert float(red[1:].abs().max()) == 0.0
    assert not torch.equal(red[:, 0], red[:, -1])


def test_caption_grammar_round_trip_and_errors():
    for clip in video.all_clips():
        for template in (video.TRAIN_TEMPLATE, video.EVAL_TEMPLATE):
            assert parse_caption(clip.caption(template)) == clip
    assert parse_caption("A Red Square Moving Left ") == Clip("red", "square", "left")
    for bad in ("a red square on the left", "a purple square moving left",
                "a red square moving sideways", ""):
        with pytest.raises(ValueError, match="caption"):
            parse_caption(bad)
    with pytest.raises(ValueError, match=r"Clip\.direction"):
        Clip("red", "square", "north")


def test_prompt_source_splits_phrasings_of_the_same_clips():
    splits = build_prompts("video")
    assert len(splits.train) == len(splits.eval) == 64
    assert {i.prompt for i in splits.train}.isdisjoint({i.prompt for i in splits.eval})
    assert [i.metadata for i in splits.train] == [i.metadata for i in splits.eval]
    first = [video.parse_caption(i.prompt) for i in splits.eval[:16]]
    assert len({(c.color, c.shape) for c in first}) == 16
    assert sorted(c.direction for c in first) == sorted(DIRECTIONS * 4)
    assert set(map(video.parse_caption, (i.prompt for i in splits.eval))) == set(video.all_clips())
    assert splits.train[0].prompt == "a red circle moving left"
    assert splits.eval[0].prompt == "a red circle that moves left"
    with pytest.raises(ValueError, match="takes no options"):
        build_prompts("video", foo=1)
    words = set(video.vocabulary())
    assert {"moving", "moves", "that", "up", "cross"} <= words


def test_judge_is_accurate_on_fresh_renders():
    clips = [c for c in video.all_clips() for _ in range(4)]
    scores, correct = _judged(render_batch(clips, seed=11), clips)
    for clause in CLAUSES:
        assert float(correct[clause].float().mean()) >= 0.98, clause
        assert float(scores[clause].mean()) >= 0.9, clause


@pytest.mark.parametrize("clause", CLAUSES)
def test_each_clause_can_be_judged_false(clause):
    clips = video.all_clips()[::3]
    rendered = render_batch(clips, seed=5)
    wrong = [WRONG[clause](c) for c in clips]
    scores, correct = _judged(rendered, wrong)
    assert not bool(correct[clause].any()), clause
    assert float(scores[clause].max()) < 0.3, clause
    for other in set(CLAUSES) - {clause}:  # the other clauses are still right
        assert bool(correct[other].all()), (clause, other)


def test_still_reversed_and_blank_clips():
    clips = [Clip("blue", "cross", d) for d in DIRECTIONS]
    rendered = render_batch(clips, seed=2)
    still = rendered[:, :, :1].expand_as(rendered).clone()  # first frame held
    scores, correct = _judged(still, clips)
    assert not bool(correct["direction"].any()) and float(scores["direction"].max()) < 0.1
    assert bool(correct["color"].all()) and bool(correct["shape"].all())
    reversed_ = rendered.flip(2)  # played backwards: moves the opposite way
    _, correct = _judged(reversed_, clips)
    assert not bool(correct["direction"].any())
    _, correct = _judged(reversed_, [WRONG["direction"](c) for c in clips])
    assert bool(correct["direction"].all())
    scores, correct = _judged(torch.zeros_like(rendered), clips)
    assert all(float(scores[c].abs().max()) == 0.0 and not bool(correct[c].any()) for c in CLAUSES)


def test_an_object_that_vanishes_loses_colour_and_shape_score():
    clips = [Clip("green", "triangle", "right")]
    rendered = render_batch(clips, seed=4)
    half = rendered.clone()
    half[:, :, 2:] = 0.0  # gone after two frames
    full, _ = _judged(rendered, clips)
    cut, _ = _judged(half, clips)
    assert float(cut["color"][0]) == pytest.approx(float(full["color"][0]) / 2, abs=1e-4)
    assert float(cut["shape"][0]) == pytest.approx(float(full["shape"][0]) / 2, abs=1e-4)


def test_fit_velocity_hand_cases():
    frames = torch.arange(4, dtype=torch.float32)
    points = torch.stack([3.0 + 1.5 * frames, 8.0 - 2.0 * frames], dim=1)[None]  # (1, 4, 2)
    velocity, known = judge_mod.fit_velocity(points, torch.ones(1, 4, dtype=torch.bool))
    assert torch.allclose(velocity, torch.tensor([[1.5, -2.0]])) and bool(known[0])
    found = torch.tensor([[True, False, True, True]])
    bent = points.clone()
    bent[0, 1] = 100.0  # a frame without an object is ignored
    velocity, _ = judge_mod.fit_velocity(bent, found)
    assert torch.allclose(velocity, torch.tensor([[1.5, -2.0]]), atol=1e-5)
    velocity, known = judge_mod.fit_velocity(points, torch.tensor([[False, True, False, False]]))
    assert torch.equal(velocity, torch.zeros(1, 2)) and not bool(known[0])


def test_rewards_and_monitor_are_registered():
    clips = video.all_clips()[:6]
    rendered = render_batch(clips, seed=1)
    prompts = [c.caption() for c in clips]
    meta = [c.metadata() for c in clips]
    value, info = build_reward("video_clauses")(rendered, prompts, meta)
    assert value.shape == (6,) and float(value.min()) > 0.9
    assert {"score_direction", "correct_color"} <= set(info)
    wrong_meta = [WRONG["direction"](c).metadata() for c in clips]  # metadata wins over text
    value, _ = build_reward("video_direction")(rendered, prompts, wrong_meta)
    assert float(value.max()) < 0.3
    out = build_monitor("video_judge")(rendered, prompts, meta)
    assert out["video_acc_all"] == 1.0 and set(out) == {
        "video_acc_color", "video_acc_shape", "video_acc_direction", "video_acc_all", "video_score"}
    with pytest.raises(ValueError, match=r"\(B, 3, F, H, W\)"):
        build_reward("video_clauses")(rendered[:, :, 0], prompts, meta)


def test_pretrain_cli_builds_the_video_base(tmp_path, monkeypatch, capsys):
    from flowdppo.cli import main
    from flowdppo.models.toy_video import ToyVideoFlowModel

    quick = {**video.BASE_RECIPE, "train": {**video.BASE_RECIPE["train"], "num_steps": 2},
             "data": {"num_clips": 64, "seed": 0}}
    monkeypatch.setattr(video, "BASE_RECIPE", quick)
    assert main(["pretrain", "--world", "video", "--cache-dir", str(tmp_path)]) == 0
    base = next(tmp_path.glob("video_base-*"))
    assert str(base) in capsys.readouterr().out
    model = ToyVideoFlowModel.from_pretrained(base)
    assert model.latent_shape == (3, video.NUM_FRAMES, 16, 16)
    assert video.ensure_video_base(cache_dir=tmp_path) == base  # a cache hit


def test_shipped_base_is_small_matches_the_recipe_and_seeds_the_cache(tmp_path):
    size = sum(f.stat().st_size for f in video.ASSET_DIR.rglob("*") if f.is_file())
    assert size < 2_000_000, size
    assert video.shipped_base_matches(video.BASE_RECIPE)
    assert not video.shipped_base_matches({**video.BASE_RECIPE, "version": -1})
    cached = video.ensure_video_base(cache_dir=tmp_path)  # a copy, not a pretraining run
    shipped = (video.ASSET_DIR / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert (cached / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == shipped
