"""``flowdppo pretrain``: build (or rebuild) a built-in world's base model and its reward
models in the cache, so the first ``flowdppo train`` starts at once."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)

# Reward models a world caches beside its base: "module:function(cache_dir=, force=)".
_WORLD_EXTRAS = {"digits": ("flowdppo.worlds.digits_rewards:ensure_digit_classifier",)}


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    from . import BUILTIN_BASES

    parser = subparsers.add_parser(
        "pretrain", help="pretrain and cache a built-in world's base model (done on first use)")
    parser.add_argument("--world", default="digits", metavar="NAME",
                        help=f"world: one of {sorted(BUILTIN_BASES)} or package.module:function "
                        "(default: digits)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even when the cache holds this recipe")
    parser.add_argument("--cache-dir", default=None,
                        help="cache folder (default: $FLOWDPPO_CACHE or ~/.cache/flowdppo)")
    parser.set_defaults(func=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    from ..registry import import_dotted
    from . import WORLDS

    base = WORLDS.lookup(args.world)(cache_dir=args.cache_dir, force=args.force)
    for target in _WORLD_EXTRAS.get(args.world, ()):
        import_dotted(target)(cache_dir=args.cache_dir, force=args.force)
    print(f"{args.world} base model: {base}")
    return 0
