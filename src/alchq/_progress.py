"""Where ``task.alchq_progress()`` goes: the worker running the task, if any.

A leaf module (the model calls it; the worker plugs its writer in while a
task runs). Outside a worker, progress goes nowhere: a ``run()`` called by
hand, in a test or a shell, reports without effect.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from typing import Protocol

#: Longest progress message kept (longer ones are cut).
MESSAGE_LENGTH = 255


class Sink(Protocol):
    def report(self, task: object, fraction: float | None, message: str | None) -> None: ...


_local = threading.local()


def checked(fraction: object, message: object) -> tuple[float | None, str | None]:
    """``fraction`` and ``message`` as stored, or ValueError/TypeError saying what is wrong."""
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise TypeError(f"progress must be a number from 0 to 1 or None, got {fraction!r}")
        if not math.isfinite(fraction) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"progress must be from 0 to 1 (0.42 is 42%), got {fraction!r}")
        fraction = float(fraction)
    if message is not None:
        if not isinstance(message, str):
            raise TypeError(f"a progress message must be a str or None, got {type(message)}")
        message = message[:MESSAGE_LENGTH]
    return fraction, message


def report(task: object, fraction: float | None, message: str | None) -> bool:
    """Hand progress to this thread's worker; False when no worker runs the task here."""
    sink: Sink | None = getattr(_local, "sink", None)
    if sink is None:
        return False
    sink.report(task, fraction, message)
    return True


@contextlib.contextmanager
def reporting_to(sink: Sink) -> Iterator[None]:
    """While run() runs in this thread, its progress goes to ``sink``."""
    before = getattr(_local, "sink", None)
    _local.sink = sink
    try:
        yield
    finally:
        _local.sink = before
