"""Offline model resolution and lazy loading shared by the model-based rewards.

Rewards never reach the network: a model argument is either a local directory or a
Hugging Face hub id that must already be in the local cache (``local_files_only``).
A missing model raises :class:`MissingModelError` naming the argument and the command
that fetches it. Models load on the first call, in a thread-safe way, so building a
reward is cheap and a reward may be scored from a worker thread.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class MissingModelError(FileNotFoundError, ValueError):
    """A model directory, hub id or weight file is not available locally.

    A `ValueError` too, so the command line reports it as one line of input error.
    """


def resolve_model_dir(name_or_path: str, *, argument: str, reward: str) -> Path:
    """The local directory of a model given as a path or a cached hub id.

    Args:
        name_or_path (`str`): a local directory, or a hub id such as
            ``yuvalkirstain/PickScore_v1`` already downloaded to the Hugging Face cache.
        argument (`str`): the reward's keyword argument, named in errors.
        reward (`str`): the reward's registry name, named in errors.

    Returns:
        `Path`: a directory holding the model's files. Nothing is downloaded.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        # Never downloads: a reward must not reach the network at train or test time.
        return Path(snapshot_download(str(name_or_path), local_files_only=True))
    except (FileNotFoundError, HFValidationError, OSError) as err:
        raise MissingModelError(
            f"{reward}: {argument}={name_or_path!r} is neither a local directory nor a hub id "
            f"in the local Hugging Face cache ({type(err).__name__}). Fetch it on a machine with "
            f"network: `hf download {name_or_path}` (older clients: `huggingface-cli download "
            f"{name_or_path}`), or pass a local directory."
        ) from None


def require_file(path: str | None, *, argument: str, reward: str, hint: str) -> Path:
    """``path`` as an existing file, else a `MissingModelError` naming ``argument`` and ``hint``."""
    if not path:
        raise MissingModelError(f"{reward}: {argument} is required: {hint}")
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise MissingModelError(f"{reward}: {argument}={str(path)!r}: no such file; {hint}")
    return resolved


def parse_dtype(dtype: str | torch.dtype, *, reward: str) -> torch.dtype:
    """A torch dtype from ``"float32"``, ``"float16"``, ``"bfloat16"`` or a `torch.dtype`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"{reward}: dtype={dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


class LazyModel:
    """Holds a model that ``_load`` builds on first use; the first caller loads, others wait."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded = False

    def _load(self) -> None:
        raise NotImplementedError

    def ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if not self._loaded:
                self._load()
                self._loaded = True
