"""Config-level faults from the fault-injection pass: each is refused before any model
loads, with the field named (issue 10, Deliver 6)."""

from __future__ import annotations

import argparse

import pytest

from flowdppo.arguments import positive_int
from flowdppo.cli import build_parser, main
from flowdppo.config import ConfigError, load_config, resolve


@pytest.mark.parametrize("value", [0, -3])
def test_eval_max_prompts_below_one_is_refused_by_validation(value):
    with pytest.raises(ConfigError, match=rf"`eval.max_prompts`={value}: must be >= 1"):
        resolve(load_config(None, [f"eval.max_prompts={value}"]))


def test_eval_max_prompts_zero_stops_train_before_the_model_loads(monkeypatch, tmp_path, capsys):
    from flowdppo.trainer import setup

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the config was validated")

    monkeypatch.setattr(setup, "load_model", no_model)
    code = main(["train", "--output-dir", str(tmp_path / "run"), "eval.max_prompts=0"])
    assert code == 2
    assert "`eval.max_prompts`=0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["nan", ".inf", "-.inf", "0", "-2"])
def test_lora_alpha_must_be_a_finite_positive_number(value):
    with pytest.raises(ConfigError, match=r"`lora.alpha`=.*must be a finite number > 0"):
        resolve(load_config(None, [f"lora.alpha={value}"]))


def test_lora_alpha_is_not_checked_when_lora_is_off():
    resolved = resolve(load_config(None, ["lora.enabled=false", "lora.alpha=nan"]))
    assert resolved.config.lora.enabled is False


@pytest.mark.parametrize("text", ["", "\n\n", "# a recipe with every line commented out\n"])
def test_an_empty_recipe_file_is_refused(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"recipe.yaml' is empty \(or holds only comments\)"):
        load_config(str(path))


def test_an_explicit_empty_mapping_still_asks_for_the_defaults(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("{}\n")
    assert load_config(str(path)).algorithm.name == "dppo"


def test_positive_int_refuses_zero_instead_of_meaning_the_default():
    assert positive_int("3") == 3
    for text in ("0", "-1", "two"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected an integer >= 1"):
            positive_int(text)


def test_sample_steps_zero_is_an_error_not_the_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["sample", "--run", "r", "--prompt", "p", "--steps", "0"])
    assert exit_info.value.code == 2
    assert "--steps: expected an integer >= 1, got 0" in capsys.readouterr().err
    args = build_parser().parse_args(["sample", "--run", "r", "--prompt", "p", "--steps", "5"])
    assert args.steps == 5
