"""The digits world: data, prompt grammar, reward classifier, judge, rewards, FD, CLI, base."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from flowdppo.prompts import build_prompts
from flowdppo.rewards import build_monitor, build_reward
from flowdppo.worlds import digits, digits_rewards
from flowdppo.worlds.digits import (
    EVAL_TEMPLATES,
    TRAIN_TEMPLATES,
    build_digits_prompts,
    load_digits_dataset,
    parse_digit_label,
    vocabulary,
)
from flowdppo.worlds.digits_rewards import ink_level, judge_scores, real_splits


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add spin-wait overhead
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache with the reward classifier built once (~2 s)."""
    path = tmp_path_factory.mktemp("cache")
    digits_rewards.ensure_digit_classifier(cache_dir=path)
    return str(path)


def test_dataset_ranges_match_sklearn():
    from sklearn.datasets import load_digits

    images, labels = load_digits_dataset()
    raw = load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert float(images.min()) == -1.0 and float(images.max()) == 1.0
    np.testing.assert_allclose(images[:, 0].numpy(), raw.images / 8.0 - 1.0, atol=1e-6)
    assert sorted(labels.unique().tolist()) == list(range(10))
    assert torch.equal(labels, torch.as_tensor(raw.target))


def test_prompt_grammar_train_eval_disjoint_and_labelled():
    splits = build_prompts("digits")
    assert set(TRAIN_TEMPLATES).isdisjoint(EVAL_TEMPLATES)
    for items, templates in ((splits.train, TRAIN_TEMPLATES), (splits.eval, EVAL_TEMPLATES)):
        assert {i.metadata["label"] for i in items} == set(range(10))
        assert {i.metadata["template"] for i in items} == set(templates)
        for item in items:
            assert parse_digit_label(item.prompt) == item.metadata["label"]
    assert not {i.prompt for i in splits.train} & {i.prompt for i in splits.eval}
    # Template-major order: the first 20 eval prompts hold every label twice.
    assert np.bincount([i.metadata["label"] for i in splits.eval[:20]]).tolist() == [2] * 10
    prompts = {i.prompt for i in splits.train + splits.eval}
    assert {"a handwritten seven", "a drawing of an eight", "the number 3"} <= prompts
    with pytest.raises(ValueError, match="held out"):
        build_digits_prompts(train_templates=["the digit {name}"], eval_templates=["the digit {name}"])


def test_vocabulary_covers_every_prompt():
    from flowdppo.models.toy import ToyFlowModel

    model = ToyFlowModel.create(vocabulary(digits.BASE_RECIPE["templates"]), num_layers=1,
                                max_length=digits.BASE_RECIPE["model"]["max_length"])
    splits = build_digits_prompts()
    ids = model.tokenize([i.prompt for i in splits.train + splits.eval])
    assert ids.shape[0] == 70 and (ids[:, 0] > 0).all()


def test_parse_label_from_words_and_numerals():
    assert parse_digit_label("a handwritten Seven!") == 7
    assert parse_digit_label("the numeral 0") == 0
    assert parse_digit_label("a cat") is None
    assert parse_digit_label("one or two") is None


def test_classifier_and_judge_accuracy_on_held_out_digits(cache):
    _, _, test_x, test_y = real_splits()
    classifier = digits_rewards.load_digit_classifier(cache)
    accuracy = float((classifier(test_x).argmax(1) == test_y).float().mean())
    assert accuracy >= 0.95, accuracy
    _, correct = judge_scores(test_x, test_y)
    assert correct.mean() >= 0.95


def test_label_reward_high_for_right_label_low_for_wrong(cache):
    _, _, test_x, test_y = real_splits()
    reward = build_reward("digit_label", cache_dir=cache)
    right, info = reward(test_x, ["x"] * len(test_y), [{"label": int(k)} for k in test_y])
    wrong, _ = reward(test_x, ["x"] * len(test_y), [{"label": (int(k) + 1) % 10} for k in test_y])
    assert right.dtype == torch.float32 and right.shape == (len(test_y),)
    assert right.mean() > 0.9 and wrong.mean() < 0.05
    torch.testing.assert_close(info["p_label"], right)
    # The label can come from the prompt's words when metadata has none.
    from_words, _ = reward(test_x[:3], [f"the digit {digits.DIGIT_NAMES[int(k)]}" for k in test_y[:3]],
                           [{}] * 3)
    torch.testing.assert_close(from_words, right[:3])
    with pytest.raises(ValueError, match="no digit label"):
        reward(test_x[:1], ["a cat"], [{}])


def test_ink_reward_monotone_up_to_target_and_headroom_on_data():
    reward = build_reward("digit_ink", target=0.4, width=0.06)
    levels = torch.linspace(0.1, 0.4, 7)
    images = levels.view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    values, info = reward(images, ["x"] * 7, [{}] * 7)
    torch.testing.assert_close(info["ink"], levels)
    assert (values.diff() > 0).all() and values[-1] == pytest.approx(1.0)
    torch.testing.assert_close(values, torch.exp(-0.5 * ((levels - 0.4) / 0.06) ** 2))
    real = (load_digits_dataset()[0] + 1) / 2
    assert ink_level(real).mean() == pytest.approx(0.305, abs=0.005)
    assert reward(real, ["x"] * len(real), [{}] * len(real))[0].mean() < 0.5  # room to improve
    with pytest.raises(ValueError, match="target"):
        build_reward("digit_ink", target=1.5)


def test_label_ink_is_the_product(cache):
    _, _, test_x, test_y = real_splits()
    meta = [{"label": int(k)} for k in test_y[:16]]
    prompts = ["x"] * 16
    both, _ = build_reward("digit_label_ink", cache_dir=cache)(test_x[:16], prompts, meta)
    label, _ = build_reward("digit_label", cache_dir=cache)(test_x[:16], prompts, meta)
    ink, _ = build_reward("digit_ink")(test_x[:16], prompts, meta)
    torch.testing.assert_close(both, label * ink)


def test_judge_and_fd_monitors():
    _, _, test_x, test_y = real_splits()
    meta = [{"label": int(k)} for k in test_y]
    prompts = ["x"] * len(meta)
    judge = build_monitor("digit_judge")(test_x, prompts, meta)
    assert set(judge) == {"judge_p_label", "judge_acc"} and judge["judge_acc"] >= 0.95
    fd = build_monitor("digit_fd")
    real = fd(test_x, prompts, meta)["digit_fd"]
    blurred = fd((test_x * 0.5 + 0.25), prompts, meta)["digit_fd"]
    shuffled = fd(test_x, prompts, [{"label": (int(k) + 3) % 10} for k in test_y])["digit_fd"]
    assert real < 0.2 * blurred and real < 0.5 * shuffled


def test_pretrain_cli_builds_cache_and_reuses_it(tmp_path, monkeypatch, capsys):
    from flowdppo.cli import main

    quick = {**digits.BASE_RECIPE, "train": {**digits.BASE_RECIPE["train"], "num_steps": 2}}
    monkeypatch.setattr(digits, "BASE_RECIPE", quick)
    monkeypatch.setattr(digits_rewards, "CLASSIFIER_RECIPE",
                        {**digits_rewards.CLASSIFIER_RECIPE, "epochs": 1})
    assert main(["pretrain", "--world", "digits", "--cache-dir", str(tmp_path)]) == 0
    base = next(tmp_path.glob("digits_base-*"))
    assert (base / "toy_config.json").is_file() and (base / "recipe.json").is_file()
    assert len(list(tmp_path.glob("digits_classifier-*/classifier.safetensors"))) == 1
    assert str(base) in capsys.readouterr().out
    stamp = (base / "toy_config.json").stat().st_mtime_ns
    assert digits.ensure_digits_base(cache_dir=tmp_path) == base
    assert (base / "toy_config.json").stat().st_mtime_ns == stamp  # a cache hit: not rebuilt


@pytest.mark.slow
def test_full_base_pretraining_quality_and_load_time(tmp_path):
    """The shipped recipe: ~40 s on one core; p(label) under a 10-step ODE ~0.9."""
    from flowdppo.models.toy import ToyFlowModel
    from flowdppo.worlds.pretrain import sample_ode

    directory = digits.ensure_digits_base(cache_dir=tmp_path, progress=False)
    start = time.perf_counter()
    model = ToyFlowModel.from_pretrained(directory)
    assert time.perf_counter() - start < 2.0
    items = [i for i in build_digits_prompts().eval for _ in range(8)]
    images = sample_ode(model, [i.prompt for i in items], num_steps=10, seed=1)
    reward = build_reward("digit_label", cache_dir=str(tmp_path))
    p_label, _ = reward(images, [i.prompt for i in items], [i.metadata for i in items])
    assert p_label.mean() > 0.8
