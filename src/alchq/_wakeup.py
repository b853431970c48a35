"""Waiting for work, in one place.

An idle worker waits here between looks for ready tasks: until the poll
interval is over, or something wakes it up: a stop request, tasks committed
in this process into a table it serves, or (PostgreSQL) a notification of
tasks committed anywhere (see alchq._notify).
"""

from __future__ import annotations

import contextlib
import os
import select
import weakref
from collections.abc import Iterator, Sequence

from sqlalchemy import Engine

from alchq import _notify
from alchq._dialects import Dialect


class Waiter:
    """Where one worker sleeps while it has nothing to do.

    A pipe, not a ``threading.Event``: a signal handler runs in the main thread
    between two bytecodes, possibly while that thread holds an Event's lock
    inside its own ``wait()``; ``set()`` from the handler then waits for that
    lock for ever (seen once in CI: a SIGTERM that an idle worker never heard).
    A byte written to a pipe takes no lock.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        weakref.finalize(self, _close, self._read, self._write)

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds; True if woken before that."""
        ready, _, _ = select.select([self._read], [], [], max(0.0, timeout))
        woken = False
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read, 4096):
                woken = True
        return woken or bool(ready)

    def wake(self) -> None:
        """End the current (or the next) wait at once (thread- and signal-safe)."""
        with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending already
            os.write(self._write, b"!")

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


def _close(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
