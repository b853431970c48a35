"""Waiting for work, in one place.

An idle worker waits here between looks for ready tasks: until the poll
interval is over, or something wakes it up: a stop request, tasks committed
in this process into a table it serves, or (PostgreSQL) a notification of
tasks committed anywhere (see alchq._notify).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

from sqlalchemy import Engine

from alchq import _notify
from alchq._dialects import Dialect


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

    @contextlib.contextmanager
    def woken_by_new_tasks(
        self, tables: Sequence[tuple[str, Engine, Dialect]], *, listen: bool = True
    ) -> Iterator[None]:
        """Within this block, new tasks in ``tables`` (key, engine, dialect) end a wait."""
        keys = {key for key, _, _ in tables}
        _notify.subscribe(keys, self)
        listeners: list[_notify.Listener] = []
        if listen and _notify.enabled():
            by_engine: dict[int, tuple[Engine, Dialect, set[str]]] = {}
            for key, engine, dialect in tables:
                if dialect.listens:
                    by_engine.setdefault(id(engine), (engine, dialect, set()))[2].add(key)
            for engine, dialect, served in by_engine.values():
                listeners.append(_notify.Listener(engine, served, self.wake, dialect))
        for listener in listeners:
            listener.start()
        try:
            yield
        finally:
            for listener in listeners:
                listener.close()
            _notify.unsubscribe(keys, self)
