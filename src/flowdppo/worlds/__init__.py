"""Small offline worlds (data, prompts, rewards, base models) that run on a laptop CPU.

A world sits above prompts, rewards and models: its modules register a prompt source, its
rewards and monitors, and a base model (`WORLDS`, used by ``model.pretrained=builtin:<name>``
and ``flowdppo pretrain --world <name>``). ``flowdppo.builtins`` loads them on the first
read of any of those registries.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..lazy import module_loader
from ..registry import Registry, import_dotted

_BUILTIN_MODULES = ("flowdppo.worlds.digits", "flowdppo.worlds.shapes", "flowdppo.worlds.video")
# The worlds' reward and monitor modules (registered into `flowdppo.rewards`' registries).
_REWARD_MODULES = ("flowdppo.worlds.digits_rewards", "flowdppo.worlds.shapes_rewards",
                   "flowdppo.worlds.shapes_silhouette", "flowdppo.worlds.video_rewards")
_load_modules = module_loader(_BUILTIN_MODULES)
load_world_rewards = module_loader(_REWARD_MODULES)


# builtin:<world> base models: "module:function" returning the base model's directory; each
# function takes ``cache_dir=`` and ``force=`` (what `flowdppo pretrain` passes).
BUILTIN_BASES = {
    "digits": "flowdppo.worlds.digits:ensure_digits_base",
    "shapes": "flowdppo.worlds.shapes:ensure_shapes_base",
    "video": "flowdppo.worlds.video:ensure_video_base",
}

BaseFactory = Callable[..., str | Path]
WORLDS: Registry[BaseFactory] = Registry("world")


def register_world(name: str) -> Callable[[BaseFactory], BaseFactory]:
    """Decorator registering a world's base-model function ``(cache_dir=None, force=False)
    -> directory`` under ``name``."""
    return WORLDS.register(name)


def load_builtin_worlds() -> None:
    """Import the built-in worlds (their prompt sources register) and add their bases."""
    _load_modules()
    for name, target in BUILTIN_BASES.items():
        if not WORLDS.is_registered(name):
            WORLDS.add(name, import_dotted(target, kind="world"))


def resolve_builtin_base(name: str) -> str:
    """Directory of the built-in base model ``name`` (building and caching it if needed)."""
    try:
        factory = WORLDS.lookup(name)
    except ValueError as err:
        raise ValueError(f"`model.pretrained`=builtin:{name}: {err}") from None
    return str(factory())
