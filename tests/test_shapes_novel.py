"""The headroom benchmark's parts: the ``shapes_novel`` prompts and the silhouette judge."""

import torch

from flowdppo.compare.benchmarks import get_benchmark
from flowdppo.config import RunConfig, from_dict
from flowdppo.prompts import build_prompts
from flowdppo.rewards import build_monitor
from flowdppo.worlds.shapes import (
    HELD_OUT_PAIRS,
    SHAPES,
    Scene,
    parse_caption,
    render_batch,
    sample_dataset,
)
from flowdppo.worlds.shapes_silhouette import read_shapes, shape_correct


def _scenes(items):
    return [parse_caption(item.prompt) for item in items]


def test_novel_prompts_are_unseen_pairs_split_by_placement():
    splits = build_prompts("shapes_novel")
    train, evaluation = _scenes(splits.train), _scenes(splits.eval)
    assert len(train) == len(evaluation) == 16
    assert all((s.color, s.shape) in HELD_OUT_PAIRS for s in train + evaluation)
    assert {s.position for s in train} == {"left", "right"}
    assert {s.position for s in evaluation} == {"top", "bottom"}
    assert not {s.caption for s in train} & {s.caption for s in evaluation}
    # Every held-out pair is trained and evaluated, at both counts.
    for part in (train, evaluation):
        assert {(s.color, s.shape, s.count) for s in part} == {
            (c, sh, n) for c, sh in HELD_OUT_PAIRS for n in (1, 2)}


def test_silhouette_judge_reads_fresh_held_out_renders():
    images, scenes = sample_dataset(600, seed=123, split="eval")
    asked = torch.tensor([SHAPES.index(s.shape) for s in scenes])
    correct = shape_correct(images, asked)
    assert correct.float().mean() > 0.93
    for k, shape in enumerate(SHAPES):
        assert correct[asked == k].float().mean() > 0.85, shape


def test_silhouette_judge_rejects_a_wrong_shape_and_a_blank_image():
    scenes = [Scene("red", shape, "left", 1) for shape in SHAPES]
    images = render_batch(scenes, seed=3)
    read, image_of = read_shapes(images)
    assert image_of.tolist() == [0, 1, 2, 3]
    assert read.tolist() == [0, 1, 2, 3]
    wrong = torch.tensor([(k + 1) % 4 for k in range(4)])
    assert not shape_correct(images, wrong).any()
    blank = torch.zeros(2, 3, 16, 16)
    assert not shape_correct(blank, torch.tensor([0, 1])).any()


def test_silhouette_monitor_and_benchmark_recipe():
    monitor = build_monitor("shapes_silhouette")
    scenes = [Scene("blue", "circle", "top", 2), Scene("green", "cross", "bottom", 1)]
    images = render_batch(scenes, seed=9)
    out = monitor(images, [s.caption for s in scenes], [s.metadata() for s in scenes])
    assert out == {"silhouette_acc_shape": 1.0}
    swapped = monitor(images, [scenes[1].caption, scenes[0].caption], None)
    assert swapped == {"silhouette_acc_shape": 0.0}
    bench = get_benchmark("shapes_novel")
    from_dict(RunConfig, bench.recipe)  # a valid recipe
    assert bench.recipe["prompts"]["source"] == "shapes_novel"
