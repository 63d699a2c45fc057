"""Argument types and actions shared by the subcommands' parsers.

Kept free of heavy imports: the CLI builds every parser at start-up (``flowdppo --help``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


class HelpConfigAction(argparse.Action):
    """Like ``--help``: print the config reference and exit 0."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        from .config.docs import format_reference

        parser._print_message(format_reference(), sys.stdout)
        parser.exit()


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1 (a count where 0 must not mean "the default")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value
