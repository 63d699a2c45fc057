"""The built-in entries of every registry, loaded on a registry's first read.

This module sits at the top of the package (beside ``cli``): it may name any layer, so the
layers below it need not name each other. In particular the worlds (digits, shapes), which
build on prompts, rewards and models, register into those registries from here; neither
``flowdppo.prompts`` nor ``flowdppo.rewards`` imports ``flowdppo.worlds``.

Each package still lists its own built-in modules (``models._BUILTIN_MODULES``, ...);
this module only decides which lists a registry of a given kind needs.
"""

from __future__ import annotations

import importlib


def _call(target: str) -> None:
    module, _, function = target.partition(":")
    getattr(importlib.import_module(module), function)()


# Registry kind -> loaders ("module:function") that import the modules registering it.
_LOADERS: dict[str, tuple[str, ...]] = {
    "model": ("flowdppo.models:load_builtin_models",),
    "reward": ("flowdppo.rewards:load_builtin_rewards", "flowdppo.worlds:load_world_rewards"),
    "monitor": ("flowdppo.rewards:load_builtin_rewards", "flowdppo.worlds:load_world_rewards"),
    "algorithm": ("flowdppo.algorithms:load_builtin_algorithms",),
    "prompt source": ("flowdppo.worlds:load_builtin_worlds",),
    "world": ("flowdppo.worlds:load_builtin_worlds",),
}


def load(kind: str) -> None:
    """Import every built-in module that registers entries of ``kind`` (none for a kind
    this package has no built-ins of, e.g. a plug-in's own registry)."""
    for target in _LOADERS.get(kind, ()):
        _call(target)
