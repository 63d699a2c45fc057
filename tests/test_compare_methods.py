"""Each compared method's knob default lives in its algorithm's hparams dataclass only."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest

import flowdppo.compare.methods as methods_module
from flowdppo.algorithms import get_algorithm
from flowdppo.compare.methods import D_PAPER, METHODS, MethodPreset


def test_every_preset_reads_its_knob_default_from_the_algorithm_dataclass():
    for name, preset in METHODS.items():
        hparams = get_algorithm(preset.algorithm).hparams
        assert preset.hparams_type is hparams, name
        default = {f.name: f.default for f in dataclasses.fields(hparams)}[preset.knob]
        assert preset.default == default, name
    assert METHODS["dppo"].paper_value == METHODS["dppo"].default
    assert METHODS["dppo_cps"].paper_value == pytest.approx(10 * METHODS["dppo"].default)
    assert METHODS["dppo_tv"].paper_value == pytest.approx(math.sqrt(METHODS["dppo"].default * D_PAPER / math.pi))


def test_a_changed_default_flows_through_with_only_the_rescaling_applied():
    @dataclasses.dataclass(frozen=True)
    class Fake:
        threshold: float = 3e-7

    preset = MethodPreset("dppo", Fake, "flow_sde", "threshold", True)
    assert preset.knob_value(64, factor=2.0) == pytest.approx(3e-7 * D_PAPER / 64 * 2.0)
    assert preset.overrides(64)["algorithm"]["hparams"] == {"threshold": pytest.approx(3e-7 * 1024)}
    with pytest.raises(ValueError, match="not a field"):
        MethodPreset("dppo", Fake, "flow_sde", "clip_range", True)


def test_methods_module_writes_no_knob_default():
    source = Path(methods_module.__file__).read_text()
    numbers = {float(x) for x in re.findall(r"(?<![\w.])\d+(?:\.\d+)?e-\d+", source)}
    defaults = {p.default for p in METHODS.values()}
    assert not numbers & defaults, f"methods.py repeats a default: {sorted(numbers & defaults)}"


def test_tv_grid_points_beyond_a_probability_are_invalid():
    tv = METHODS["dppo_tv"]
    assert tv.valid_factor(64, 1.0) and not tv.valid_factor(64, 31.6)
    assert METHODS["grpo"].valid_factor(64, 1e6)
