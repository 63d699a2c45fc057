"""Small offline worlds (data, prompts, rewards, base models) that run on a laptop CPU."""

from __future__ import annotations

import importlib

from ..lazy import module_loader

_BUILTIN_MODULES = ("flowdppo.worlds.digits", "flowdppo.worlds.shapes", "flowdppo.worlds.video")
load_builtin_worlds = module_loader(_BUILTIN_MODULES)


# builtin:<world> base models: "module:function" returning the base model's directory.
BUILTIN_BASES = {
    "digits": "flowdppo.worlds.digits:ensure_digits_base",
    "shapes": "flowdppo.worlds.shapes:ensure_shapes_base",
    "video": "flowdppo.worlds.video:ensure_video_base",
}


def resolve_builtin_base(name: str) -> str:
    """Directory of the built-in base model ``name`` (building and caching it if needed)."""
    if name not in BUILTIN_BASES:
        raise ValueError(f"`model.pretrained`=builtin:{name}: unknown built-in base; expected one "
                         f"of {sorted(BUILTIN_BASES)}")
    module, function = BUILTIN_BASES[name].split(":")
    return str(getattr(importlib.import_module(module), function)())
