"""Exceptions the CLI reports in one line (kept free of heavy imports: the CLI loads it)."""

from __future__ import annotations


class RemoteRewardError(RuntimeError):
    """A reward server that failed, answered wrongly or could not be reached (after retries).

    The server, not the run's configuration, is at fault; checkpoints already written stay.
    """


class RewardsExhaustedError(RuntimeError):
    """Every image of several consecutive iterations was dropped for a non-finite reward."""
