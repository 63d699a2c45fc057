"""Model adapters. Heavy families register lazily so importing flowdppo stays fast."""

from __future__ import annotations

import importlib

from .base import MODELS, Conditioning, FlowModel, build_model, register_model

# Modules whose import registers adapters; a missing optional family is skipped.
_BUILTIN_MODULES = ("flowdppo.models.toy", "flowdppo.models.sd3", "flowdppo.models.flux",
                    "flowdppo.models.flux2")
_loaded = False


def load_builtin_models() -> None:
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


__all__ = ["MODELS", "Conditioning", "FlowModel", "build_model", "load_builtin_models",
           "register_model"]
