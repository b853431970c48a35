"""A worker process's line to its supervisor (``alchq run`` runs every worker supervised).

The supervisor is a separate process, so a task that holds the interpreter
(a long C call, a catastrophic regex) cannot starve it: it renews the
worker's registry row, enforces time limits by signal and, as a last resort,
by killing and replacing the worker process. For that it must know what the
worker holds: the worker tells it here, one JSON line per event, on a pipe
the supervisor opened (``ALCHQ_SUPERVISOR_FD``).

Outside a supervised process (a worker started from code) this does nothing.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

#: The write end of the pipe to the supervisor, in a supervised worker process.
FD_ENV = "ALCHQ_SUPERVISOR_FD"
#: Set for a worker process: its supervisor's pid.
SUPERVISOR_PID_ENV = "ALCHQ_SUPERVISOR_PID"
#: Set for a new worker process: ids of the workers of the one it replaces,
#: whose claims and error() calls it takes over at once.
ADOPT_ENV = "ALCHQ_ADOPT"


class Link:
    """Sends events to the supervisor; does nothing without one."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    @property
    def supervised(self) -> bool:
        return self._fd is not None

    def send(self, op: str, **fields: Any) -> None:
        """One event (thread-safe). A supervisor that is gone is not an error here."""
        if self._fd is None:
            return
        line = (json.dumps({"op": op, **fields}, default=str) + "\n").encode()
        with self._lock:
            try:
                os.write(self._fd, line)
            except OSError:
                self._fd = None


def from_environment() -> Link:
    raw = os.environ.get(FD_ENV)
    try:
        return Link(int(raw)) if raw else Link(None)
    except ValueError:
        return Link(None)


#: This process's link (one per process: the pipe is the process's).
link = from_environment()
