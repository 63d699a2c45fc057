"""Model adapters. Heavy families register lazily so importing flowdppo stays fast."""

from __future__ import annotations

from ..lazy import module_loader
from .base import MODELS, Conditioning, FlowModel, build_model, register_model

# Modules whose import registers adapters; a missing optional family is skipped.
_BUILTIN_MODULES = ("flowdppo.models.toy", "flowdppo.models.sd3", "flowdppo.models.flux",
                    "flowdppo.models.flux2", "flowdppo.models.qwenimage", "flowdppo.models.zimage",
                    "flowdppo.models.wan", "flowdppo.models.toy_video")
load_builtin_models = module_loader(_BUILTIN_MODULES)


__all__ = ["MODELS", "Conditioning", "FlowModel", "build_model", "load_builtin_models",
           "register_model"]
