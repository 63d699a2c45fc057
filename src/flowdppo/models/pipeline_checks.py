"""Checks a diffusers model folder passes before any weight loads, and the loading itself.

Shared by every :class:`~flowdppo.models.diffusers_common.DiffusersFlowModel` family (and by
``config/validate.py``): which values are hub ids, which folders exist, that the folder's
``model_index.json`` names the adapter's pipeline class, that the resolution suits the
transformer, plus ``from_pretrained`` without deprecated arguments and with loading bars
that follow the run's ``logging.progress_bar``. Every error is a
:class:`~flowdppo.errors.ModelLoadError` (a ``ValueError``) or
:class:`~flowdppo.errors.ModelNotFoundError` (a ``FileNotFoundError``) naming the key to fix.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError, ModelNotFoundError

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
PRETRAINED_KEY = "model.pretrained"
RESOLUTION_KEY = "model.kwargs.resolution"


def is_hub_id(pretrained: str) -> bool:
    """Whether ``pretrained`` names a Hugging Face hub repository rather than a local folder.

    Only a bare ``owner/name`` is a hub id, and only when it is not a local path: an
    existing path, or one whose first part is an existing folder here (``pipes/sd3x`` when
    ``pipes/`` exists), is local. Anything anchored (``/``, ``.``, ``~``), deeper or
    owner-less is a path too. ``config/validate.py`` decides with this same function.
    """
    if Path(pretrained).expanduser().exists() or not _HUB_ID.fullmatch(pretrained):
        return False
    return not Path(pretrained.split("/", 1)[0]).is_dir()


def missing_folder_error(pretrained: str, key: str = PRETRAINED_KEY) -> ModelNotFoundError:
    """The error for a path-like ``pretrained`` that does not exist (names cwd and near misses)."""
    path = Path(pretrained).expanduser().absolute()
    message = f"`{key}`={pretrained!r}: no such directory {path} (current directory {Path.cwd()})"
    if path.parent.is_dir():
        names = [p.name for p in path.parent.iterdir() if p.is_dir()]
        close = difflib.get_close_matches(path.name, names, n=1)
        if close:
            message += f"; did you mean {path.parent / close[0]}?"
    return ModelNotFoundError(message + "; give an existing pipeline folder or a hub id "
                              "`owner/name` in the local Hugging Face cache")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def locate_pipeline(pretrained: str, *, allow_download: bool = False,
                    cache_dir: str | None = None, missing_ok: bool = False) -> Path | None:
    """The local folder holding ``pretrained``'s ``model_index.json``, found without loading.

    A local folder is returned as it is; a hub id resolves to its snapshot in the Hugging
    Face cache. ``None`` when the pipeline is not local yet but may be downloaded
    (``allow_download`` and not ``HF_HUB_OFFLINE``), or, with ``missing_ok``, when an
    uncached hub id is left for the loader to report.

    Raises:
        ModelNotFoundError: a path-like value that does not exist, or a hub id that is not
            cached and may not be downloaded (the message gives the download command).
    """
    path = Path(pretrained).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"`{PRETRAINED_KEY}`={pretrained!r} is a file; give the pipeline "
                             "folder (the one holding model_index.json)")
    if not is_hub_id(pretrained):
        raise missing_folder_error(pretrained)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(pretrained, "model_index.json", cache_dir=cache_dir)
    if isinstance(cached, str):
        return Path(cached).parent
    if missing_ok or (allow_download and not _offline()):
        return None
    why = "HF_HUB_OFFLINE is set" if _offline() else "downloads are off (allow_download=False)"
    raise ModelNotFoundError(
        f"`{PRETRAINED_KEY}`={pretrained!r} is no folder under {Path.cwd()} and not in the local "
        f"Hugging Face cache, and {why}; download it first with `hf download {pretrained}` "
        "(older clients: `huggingface-cli download`; gated models such as SD3.5 and FLUX.1-dev "
        "need `hf auth login` and the licence accepted on the model page), or give a local folder")


def family_for_pipeline(class_name: str) -> str | None:
    """The registered model family whose adapter wraps pipeline class ``class_name``."""
    from . import MODELS, load_builtin_models

    load_builtin_models()
    for name, factory in MODELS.items():
        if getattr(factory, "pipeline_class_name", None) == class_name:
            return name
    return None


def check_pipeline_class(folder: Path, pretrained: str, family: str, expected: str) -> None:
    """``folder/model_index.json`` declares ``expected`` (else the error names the family to use).

    Runs before any weight loads: ``from_pretrained`` of the wrong class would build it
    from another family's parts and fail later in a raw traceback.
    """
    index = folder / "model_index.json"
    where = f"`{PRETRAINED_KEY}`={pretrained!r}"
    if not index.is_file():
        hint = ("it holds a toy model: set `model.name=toy`" if (folder / "toy_config.json").is_file()
                else "a diffusers pipeline folder has one (write it with pipe.save_pretrained)")
        raise ModelLoadError(f"{where}: {folder} has no model_index.json; {hint}")
    found = json.loads(index.read_text()).get("_class_name")
    if found == expected:
        return
    other = family_for_pipeline(str(found))
    fix = (f"set `model.name={other}`" if other else "no flowdppo model family loads it")
    raise ModelLoadError(f"{where} holds a {found}, but `model.name`={family} loads a {expected}; "
                         f"{fix}, or point `{PRETRAINED_KEY}` at a {expected} folder")


def read_component_config(folder: Path | None, component: str) -> dict[str, Any] | None:
    """``folder/<component>/config.json`` as a dict, or None when it is not on disk."""
    path = folder / component / "config.json" if folder is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def vae_scale_factor(vae_config: dict[str, Any] | None) -> int:
    """The VAE's spatial factor as the pipelines compute it (8 without a VAE config)."""
    if not vae_config or "block_out_channels" not in vae_config:
        return 8
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def check_resolution(resolution: int, *, family: str, multiple: int,
                     largest: int | None = None, why_largest: str = "") -> None:
    """``resolution`` is a positive multiple of ``multiple`` pixels, at most ``largest``.

    The error names ``model.kwargs.resolution`` and the valid values (for a transformer
    with learned positions, the largest it can take and where that limit comes from).
    """
    where = f"`{RESOLUTION_KEY}`={resolution}"
    if largest is not None and resolution > largest:
        raise ModelLoadError(f"{where}: this {family} transformer takes at most {largest} px "
                             f"({why_largest}); set `{RESOLUTION_KEY}={largest}` or less, a "
                             f"multiple of {multiple}")
    if resolution <= 0 or resolution % multiple:
        below = max(multiple, resolution // multiple * multiple)
        limit = f" up to {largest}" if largest is not None else ""
        raise ModelLoadError(f"{where}: {family} needs a positive multiple of {multiple} "
                             f"pixels{limit} (e.g. {below} or {below + multiple})")


def _dtype_kwargs(dtypes: dict[str, torch.dtype]) -> dict[str, Any]:
    """``dtype=`` for diffusers >= 0.42 (``torch_dtype`` is deprecated there), else the old name."""
    import diffusers
    from packaging.version import Version

    new = Version(diffusers.__version__).release >= (0, 42)
    return {"dtype": dtypes} if new else {"torch_dtype": dtypes}


@contextlib.contextmanager
def loading_progress(enabled: bool) -> Iterator[None]:
    """Turn diffusers' and transformers' loading / download bars on or off inside the block.

    The previous settings are restored afterwards. The trainer passes
    ``logging.progress_bar`` so a run's log stays free of tqdm bars when it is off.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    changed = []
    for module in (diffusers_logging, transformers_logging):
        if module.is_progress_bar_enabled() != enabled:
            (module.enable_progress_bar if enabled else module.disable_progress_bar)()
            changed.append(module)
    try:
        yield
    finally:
        for module in changed:
            (module.disable_progress_bar if enabled else module.enable_progress_bar)()


def load_pipeline(pipeline_cls: type, pretrained: str, *, dtype: torch.dtype,
                  vae_dtype: torch.dtype, allow_download: bool = False,
                  cache_dir: str | None = None) -> Any:
    """``pipeline_cls.from_pretrained`` from a local directory or the local Hugging Face cache.

    Nothing is downloaded unless ``allow_download`` is set and ``HF_HUB_OFFLINE`` is not;
    call :func:`locate_pipeline` (and the checks) first for clear errors. The VAE loads in
    ``vae_dtype`` directly (casting a bf16 copy up would lose precision).
    """
    dtypes = {"default": dtype, "vae": vae_dtype}
    path = Path(pretrained).expanduser()
    if path.is_dir():
        return pipeline_cls.from_pretrained(str(path), **_dtype_kwargs(dtypes))
    local_only = _offline() or not allow_download
    return pipeline_cls.from_pretrained(pretrained, cache_dir=cache_dir,
                                        local_files_only=local_only, **_dtype_kwargs(dtypes))
