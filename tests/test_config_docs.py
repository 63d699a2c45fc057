"""Every config key is documented once, in ``schema.py``, and that documentation reaches the
user: ``flowdppo train --help-config``, TensorBoard's hparams table; every example key in
the CLI's help and the docs is a real key."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from pathlib import Path

import pytest

from flowdppo.config import RunConfig, to_dict
from flowdppo.config.docs import config_keys, field_doc, format_reference

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = [f.name for f in dataclasses.fields(RunConfig)
            if dataclasses.is_dataclass(typing.get_type_hints(RunConfig)[f.name])]


def _schema_classes(cls: type = RunConfig) -> list[type]:
    found = [cls]
    for tp in typing.get_type_hints(cls).values():
        for inner in (tp, *typing.get_args(tp)):
            if dataclasses.is_dataclass(inner) and inner not in found:
                found += [c for c in _schema_classes(inner) if c not in found]
    return found


def test_every_schema_field_has_a_doc():
    classes = _schema_classes()
    assert len(classes) >= 14
    missing = [f"{cls.__name__}.{f.name}" for cls in classes for f in dataclasses.fields(cls)
               if not field_doc(cls, f.name)]
    assert missing == [], f"document these fields in schema.py with a trailing comment: {missing}"


def test_docs_come_from_the_schema_comments():
    from flowdppo.config.schema import OptimConfig, TrainConfig

    assert field_doc(OptimConfig, "lr") == "AdamW learning rate"
    # A comment block above a field belongs to it.
    assert field_doc(TrainConfig, "old_means").startswith("Likelihood methods' old means")
    keys = {k.key: k for k in config_keys()}
    assert keys["sampling.num_steps"].default == 10 and keys["sampling.num_steps"].type == "int"
    assert "rewards.items[].name" in keys and "eval.monitors[].weight" in keys


def test_help_config_lists_every_key_with_its_doc(capsys):
    from flowdppo.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help-config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out == format_reference()
    keys = config_keys()
    assert len(keys) > 60
    for key in keys:
        assert f"  {key.key}: " in out
        assert key.doc.split()[0] in out
    assert "AdamW learning rate" in out and "[optim] AdamW and its learning-rate schedule." in out


def _schema_key_exists(dotted: str) -> bool:
    """Whether ``dotted`` (``optim.lr``, ``model.kwargs.resolution``) names a config key."""
    from flowdppo.algorithms import ALGORITHMS

    cls: typing.Any = RunConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        tp = hints[part]
        if dotted.startswith("algorithm.hparams.") and i == 1:
            fields = {f.name for spec in ALGORITHMS.values()
                      for f in dataclasses.fields(spec.hparams)}
            return len(parts) == 3 and parts[2] in fields
        if typing.get_origin(tp) is dict or tp is dict:
            return True  # free-form arguments (model.kwargs.*, prompts.kwargs.*)
        if not dataclasses.is_dataclass(tp):
            return i == len(parts) - 1
        cls = tp
    return True


def _example_keys(text: str) -> set[str]:
    """``section.key`` written as an override (``optim.lr=``) or in backticks (`optim.lr`)."""
    head = "|".join(SECTIONS)
    key = rf"(?:{head})(?:\.[a-z_][a-z0-9_]*)+"
    found = set(re.findall(rf"(?<![\w.])({key})=", text))
    found |= set(re.findall(rf"`({key})(?:=[^`]*)?`", text))
    return {k for k in found if k.rsplit(".", 1)[1] not in {"jsonl", "yaml", "txt", "json", "png"}}


def _help_texts(parser: argparse.ArgumentParser) -> list[str]:
    texts = [parser.description or "", parser.epilog or ""]
    for action in parser._actions:
        texts.append(action.help or "")
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                texts += _help_texts(sub)
    return texts


def test_the_key_checker_tells_real_keys_from_wrong_ones():
    assert _schema_key_exists("optim.lr") and _schema_key_exists("model.kwargs.resolution")
    assert _schema_key_exists("algorithm.hparams.threshold")
    assert not _schema_key_exists("train.lr") and not _schema_key_exists("algorithm.hparams.lr")
    assert _example_keys("e.g. train.lr=1e-4 and `sampling.num_steps`") == {
        "train.lr", "sampling.num_steps"}


def test_every_example_key_in_help_texts_and_docs_is_a_config_key():
    from flowdppo.cli import build_parser
    from flowdppo.config.loader import ConfigError, parse_override

    texts = {"flowdppo --help": "\n".join(_help_texts(build_parser()))}
    try:
        parse_override("no-equals-sign")
    except ConfigError as err:
        texts["override error"] = str(err)
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        texts[str(path.relative_to(ROOT))] = path.read_text()
    checked = {name: _example_keys(text) for name, text in texts.items()}
    assert checked["flowdppo --help"] and checked["override error"] == {"optim.lr"}
    assert sum(len(keys) for keys in checked.values()) > 20
    wrong = {name: sorted(k for k in keys if not _schema_key_exists(k))
             for name, keys in checked.items()}
    assert {name: keys for name, keys in wrong.items() if keys} == {}


def test_tensorboard_gets_the_resolved_config_as_its_hparams_table(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from flowdppo.config import load_config
    from flowdppo.trainer.logging import RunLogger, flat_hparams

    config = to_dict(load_config(None, ["optim.lr=0.002", "algorithm.name=grpo"]))
    logger = RunLogger(tmp_path, tensorboard=True, wandb=False, wandb_project="x", config=config)
    logger.log("metrics.jsonl", {"step": 1, "loss": 0.5})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    table = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert len(table) == len(flat_hparams(config)) > 50
    assert table["optim.lr"].number_value == pytest.approx(0.002)
    assert table["algorithm.name"].string_value == "grpo"
    assert table["sampling.sde_steps.range"].string_value == "[0.0, 0.5]"
    assert "train/loss" in events.Tags()["scalars"]  # same event file as the scalars
