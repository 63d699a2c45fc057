"""Importing the built-in modules of a registry on first lookup (keeps ``import flowdppo`` fast)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence


def module_loader(modules: Sequence[str]) -> Callable[[], None]:
    """A function that imports ``modules`` once; a module that does not exist is skipped
    (an optional family), but an import error inside a module is raised."""
    loaded = False

    def load() -> None:
        nonlocal loaded
        if loaded:
            return
        loaded = True
        for module in modules:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as err:
                if not (err.name and module.startswith(err.name)):
                    raise

    return load
