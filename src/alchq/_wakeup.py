"""Waiting for work, in one place.

An idle worker waits here between looks for ready tasks: until the poll
interval is over, or something wakes it up (a stop request now; a
notification of new tasks later).
"""

from __future__ import annotations

import threading


class Waiter:
    """Where one worker sleeps while it has nothing to do."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds; True if woken before that."""
        woken = self._event.wait(timeout)
        self._event.clear()
        return woken

    def wake(self) -> None:
        """End the current (or the next) wait at once (thread- and signal-safe)."""
        self._event.set()
