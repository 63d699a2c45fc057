"""Loading checks that run before any weight loads (issue 13, item 1), and the CLI's
one-line report of every user error.

Each "Why" bullet of the issue is reproduced as a user would meet it: a recipe of one family
pointed at another family's folder, a mistyped relative folder, the recipes' 512 px on a
small model, the deprecation warning and loading bars of every load.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from flowdppo import errors
from flowdppo.cli import main
from flowdppo.config import load_config, resolve
from flowdppo.models.flux import FluxModel
from flowdppo.models.pipeline_checks import is_hub_id, loading_progress
from flowdppo.models.sd3 import SD3Model
from flowdppo.trainer.commands import RECIPES
from real_models_helpers import single_thread, tiny_pipe  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory) -> Path:
    """A tiny SD3 pipeline saved as a diffusers folder (pos_embed_max_size 16: at most 256 px)."""
    folder = tmp_path_factory.mktemp("root") / "pipes" / "sd3"
    with loading_progress(False):
        tiny_pipe("sd3").save_pretrained(folder)
    return folder


def _no_weights_loaded(monkeypatch) -> None:
    """Any from_pretrained from here on fails the test: the checks must come first."""
    import diffusers

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the check")

    for name in ("FluxPipeline", "StableDiffusion3Pipeline"):
        monkeypatch.setattr(getattr(diffusers, name), "from_pretrained", refuse)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_wrong_family_folder_names_the_family_before_loading(sd3_folder, monkeypatch):
    _no_weights_loaded(monkeypatch)
    with pytest.raises(errors.ModelLoadError, match=r"holds a StableDiffusion3Pipeline.*"
                       r"`model.name`=flux loads a FluxPipeline; set `model.name=sd3`"):
        FluxModel(str(sd3_folder), dtype="fp32", resolution=64)
    cfg = load_config(str(RECIPES / "tiny_flux.yaml"), [f"model.pretrained={sd3_folder}"])
    with pytest.raises(ValueError, match=r"set `model\.name=sd3`"):
        resolve(cfg)  # validation sees it too, before rewards or the model load


def test_cli_reports_the_wrong_family_in_one_line(sd3_folder, tmp_path, capsys):
    code = main(["train", "--config", str(RECIPES / "tiny_flux.yaml"), "--output-dir",
                 str(tmp_path / "run"), f"model.pretrained={sd3_folder}"])
    assert code == 2
    assert "set `model.name=sd3`" in _one_line_error(capsys)


def test_a_toy_folder_is_named_as_such(tiny_base):
    with pytest.raises(errors.ModelLoadError, match=r"toy model: set `model\.name=toy`"):
        SD3Model(str(tiny_base))


def test_mistyped_relative_folder_is_no_hub_id(sd3_folder, monkeypatch, capsys):
    monkeypatch.chdir(sd3_folder.parent.parent)  # ./pipes/sd3 exists
    assert is_hub_id("stabilityai/stable-diffusion-3.5-medium")
    assert not is_hub_id("pipes/sd3x")  # pipes/ is a folder here
    for path in ("./x", "~/x", "/abs/x", "a/b/c", "sd3x", "pipes/sd3"):
        assert not is_hub_id(path), path
    with pytest.raises(errors.ModelNotFoundError) as caught:
        SD3Model("pipes/sd3x")
    message = str(caught.value)
    assert f"current directory {Path.cwd()}" in message and "pipes/sd3x" in message
    assert f"did you mean {sd3_folder}" in message and "download" not in message
    assert isinstance(caught.value, FileNotFoundError)
    code = main(["train", "--config", str(RECIPES / "tiny_sd3.yaml"),
                 "model.pretrained=pipes/sd3x", "--output-dir", "out"])
    err = _one_line_error(capsys)
    assert code == 2 and "no such directory" in err and str(Path.cwd()) in err


def test_resolution_too_large_names_the_key_and_the_largest(sd3_folder, monkeypatch):
    _no_weights_loaded(monkeypatch)
    pattern = r"`model.kwargs.resolution`=512: .* at most 256 px .*pos_embed_max_size 16"
    with pytest.raises(errors.ModelLoadError, match=pattern):
        SD3Model(str(sd3_folder), dtype="fp32")  # the recipes' default 512 px
    with pytest.raises(errors.ModelLoadError, match=r"`model.kwargs.resolution=256` or less"):
        SD3Model.from_pipeline(tiny_pipe("sd3"), resolution=512)
    cfg = load_config(str(RECIPES / "tiny_sd3.yaml"),
                      [f"model.pretrained={sd3_folder}", "model.kwargs={resolution: 512}"])
    with pytest.raises(ValueError, match=pattern):
        resolve(cfg)
    with pytest.raises(errors.ModelLoadError, match=r"multiple of 16 pixels up to 256 \(e.g. 48 or 64\)"):
        SD3Model.from_pipeline(tiny_pipe("sd3"), resolution=60)


def test_loading_a_folder_warns_of_no_deprecation(sd3_folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SD3Model(str(sd3_folder), dtype="fp32", resolution=64)
    deprecated = [str(w.message) for w in caught if "deprecat" in str(w.message).lower()]
    assert not deprecated, deprecated


def test_loading_bars_follow_the_progress_bar_setting(sd3_folder, capfd):
    import torch

    from flowdppo.trainer.setup import load_model

    for enabled in (False, True):
        cfg = load_config(str(RECIPES / "tiny_sd3.yaml"), [
            f"model.pretrained={sd3_folder}", f"logging.progress_bar={str(enabled).lower()}"])
        capfd.readouterr()
        load_model(cfg, torch.device("cpu"))
        err = capfd.readouterr().err
        assert ("Loading pipeline components" in err) is enabled, err[-300:]
        assert ("Loading weights" in err) is enabled


_SUBCLASSES = [errors.FlowdppoError("bad thing"), errors.ModelLoadError("bad model"),
               errors.ModelNotFoundError("no model"), errors.RunDirectoryError("no run"),
               errors.RemoteRewardError("server down")]


@pytest.mark.parametrize("error", _SUBCLASSES, ids=lambda e: type(e).__name__)
def test_cli_reports_every_flowdppo_error_in_one_line(error, monkeypatch, capsys):
    def fail(args):
        raise error

    monkeypatch.setattr("flowdppo.trainer.export.run_export", fail)
    code = main(["export", "--run", "r", "--out", "o"])
    assert code in (1, 2)
    assert f"flowdppo export: error: {error}" in _one_line_error(capsys)
    assert all(issubclass(type(e), errors.FlowdppoError) for e in _SUBCLASSES)
