"""The ``flowdppo`` command line: one subcommand per job.

Each subcommand lives in the module that does its work and exposes
``add_cli(subparsers)``, which adds its parser and sets ``func`` to a handler taking the
parsed arguments and returning an exit code. This file only wires them together, so
``flowdppo --help`` stays fast (handlers import heavy modules lazily).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from .errors import FlowdppoError, RemoteRewardError

# Modules providing ``add_cli(subparsers)``; a missing optional one is skipped.
_COMMAND_MODULES = (
    "flowdppo.trainer.commands",
    "flowdppo.trainer.export",
    "flowdppo.worlds.commands",
    "flowdppo.compare.commands",
    "flowdppo.rewards.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowdppo",
        description="RL fine-tuning of flow-matching text-to-image models (Flow-DPPO and baselines).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if not (err.name and name.startswith(err.name)):
                raise
            continue
        module.add_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except RemoteRewardError as err:
        # A failing reward server: one line too. `train` adds what its run directory holds
        # (resume from a checkpoint, or start again when none was written).
        _report(args, str(err))
        return 1
    except KeyboardInterrupt:
        # Ctrl-C / SIGTERM: the run wrote its checkpoint at the last finished iteration.
        print(f"flowdppo {args.command}: interrupted; checkpoints written so far are kept "
              "(`flowdppo train --resume <output-dir>` continues a run)", file=sys.stderr)
        return 130
    except (FlowdppoError, ValueError) as err:
        # User errors (ours, and configuration ValueErrors): one clear line, no traceback.
        _report(args, str(err))
        return 2


def _report(args: argparse.Namespace, message: str) -> None:
    """One line on stderr; ``--verbose`` adds the traceback (for bug reports)."""
    if args.verbose:
        traceback.print_exc()
    one_line = " ".join(message.split())
    print(f"flowdppo {args.command}: error: {one_line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
