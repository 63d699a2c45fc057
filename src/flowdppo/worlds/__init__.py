"""Small offline worlds (data, prompts, rewards, base models) that run on a laptop CPU."""

from __future__ import annotations

import importlib

_BUILTIN_MODULES = ("flowdppo.worlds.digits", "flowdppo.worlds.shapes")
_loaded = False


def load_builtin_worlds() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if not (err.name and module.startswith(err.name)):
                raise
