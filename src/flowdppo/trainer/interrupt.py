"""Stop a run cleanly on SIGINT/SIGTERM: the first signal asks, the second one insists.

Inside ``with stop_on_signals(rewards.cancel) as stop:`` the first SIGINT (Ctrl-C) or
SIGTERM (a scheduler's preemption) only sets ``stop.requested`` and runs the callbacks (here:
cancel the reward service, so a wait on a stalled reward server ends within a second). The
loop polls ``stop.requested`` (or calls `check_stop`) where stopping is safe, writes its
checkpoint and leaves. A second signal raises `KeyboardInterrupt` at once. An exception
that escapes the block after a stop was requested (e.g. the `RewardCancelled` of a wait the
cancel cut short) is re-raised as `Interrupted`, so callers see one kind of stop.

Signals can only be handled on the main thread; elsewhere the block runs unguarded.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

logger = logging.getLogger(__name__)

_ACTIVE: list[StopRequest] = []  # innermost last; read by stop_requested()/check_stop()


class Interrupted(KeyboardInterrupt):
    """The run stopped because of a signal (a `KeyboardInterrupt`, so `except Exception` passes it)."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name}")
        self.signal_name = signal_name


class StopRequest:
    """Whether a stop was asked for, and by which signal."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def check(self) -> None:
        """Raise `Interrupted` if a stop was requested."""
        if self.signal_name is not None:
            raise Interrupted(self.signal_name)


def stop_requested() -> bool:
    """True once a signal asked the innermost active `stop_on_signals` block to stop."""
    return bool(_ACTIVE) and _ACTIVE[-1].requested


def check_stop() -> None:
    """Raise `Interrupted` if a signal asked to stop; the loop calls this where stopping is safe."""
    if _ACTIVE:
        _ACTIVE[-1].check()


@contextmanager
def stop_on_signals(
    *on_first: Callable[[], None],
    signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM),
) -> Iterator[StopRequest]:
    """Handle ``signals`` for the block: the first sets the flag and calls ``on_first``."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if request.requested:
            raise KeyboardInterrupt(f"second signal ({name}): stopping now")
        request.signal_name = name
        logger.warning("%s: stopping at the next safe point; send it again to stop at once", name)
        for callback in on_first:
            try:
                callback()
            except Exception:  # a failing callback must not turn the stop into a crash
                logger.exception("stop callback %r failed", callback)

    previous = {sig: signal.signal(sig, handle) for sig in signals}
    _ACTIVE.append(request)
    try:
        yield request
    except Exception as err:
        if request.requested:  # most likely a consequence of the stop (a cancelled wait)
            raise Interrupted(request.signal_name or "a signal") from err
        raise
    finally:
        _ACTIVE.remove(request)
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
