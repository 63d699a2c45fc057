"""Exceptions the CLI reports in one line (kept free of heavy imports: the CLI loads it).

Every user-facing error is a :class:`FlowdppoError`; the subclasses also derive from the
built-in type a caller would expect (``ValueError``, ``FileNotFoundError``, ...), so code
that catches those keeps working.
"""

from __future__ import annotations


class FlowdppoError(Exception):
    """A user error: the message says what was expected, what came, and how to fix it."""


class ModelLoadError(FlowdppoError, ValueError):
    """A model that cannot load as configured: wrong family for the folder, a resolution
    the transformer cannot take, a folder that is no pipeline."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """``model.pretrained`` names neither an existing folder nor a cached hub id."""


class RunDirectoryError(FlowdppoError, ValueError):
    """A run directory (or checkpoint in it) that lacks what a command needs."""


class RemoteRewardError(FlowdppoError, RuntimeError):
    """A reward server that failed, answered wrongly or could not be reached (after retries).

    The server, not the run's configuration, is at fault; checkpoints already written stay.
    """


class RewardsExhaustedError(FlowdppoError, RuntimeError):
    """Every image of several consecutive iterations was dropped for a non-finite reward."""
