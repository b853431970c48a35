"""The task a worker holds: what every stage needs to run, keep or end its claim."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Engine, Table

from alchq._dialects import Claim, Dialect
from alchq._tracking import RunWatch
from alchq._transitions import still_ours
from alchq.model import BaseQueue


class WorkerShutdown(BaseException):  # noqa: N818 - a control-flow signal, like SystemExit
    """Raised into ``run()`` when the worker must stop now (second signal, grace expired).

    A BaseException so that a task's ``except Exception`` does not swallow it.
    """


def key_of(pk: tuple[Any, ...]) -> Any:
    """A primary key as ``Session.get`` takes it: the value, or a tuple for composite keys."""
    return pk[0] if len(pk) == 1 else pk


def label(model: type[BaseQueue], claim: Claim) -> str:
    """``MyTask 42``: how logs name a task."""
    return f"{model.__name__} {key_of(claim.pk)}"


@dataclass
class Held:
    """One claimed task, from its claim until its outcome is recorded.

    Written by the task's own thread; the monitor thread reads it, and sets
    ``interrupt`` and ``hard_deadline``.
    """

    model: type[BaseQueue]
    claim: Claim
    worker_id: str
    table: Table
    engine: Engine
    dialect: Dialect
    time_limit: float
    thread_id: int = field(default_factory=threading.get_ident)
    started: float = field(default_factory=time.monotonic)
    #: True only while ``run()`` itself executes: interrupts are raised only then.
    in_run: bool = False
    #: "timeout" or "shutdown" once the task was asked to stop.
    interrupt: str | None = None
    #: monotonic time after which the monitor stops the process itself.
    hard_deadline: float | None = None
    #: failed runs before this one (for the retry policy), read when it loaded.
    failures: int = 0
    #: claims lost before this one, read when it loaded.
    lost_claims: int = 0
    #: "run" while run() is called, "error" while error() is.
    phase: str = "run"
    #: What run() does with the database, while it runs.
    watch: RunWatch | None = None

    def enter_error(self, time_limit: float) -> None:
        """From run() to error(): error() has its own time."""
        self.phase = "error"
        self.time_limit = time_limit
        self.started = time.monotonic()
        self.interrupt = None
        self.hard_deadline = None

    @property
    def what(self) -> str:
        """``MyTask 42`` or ``error() of MyTask 42``: what runs, for log lines."""
        return self.label if self.phase == "run" else f"error() of {self.label}"

    @property
    def label(self) -> str:
        return label(self.model, self.claim)

    @property
    def key(self) -> Any:
        """The primary key as ``Session.get`` takes it."""
        return key_of(self.claim.pk)

    def still_ours(self) -> ColumnElement[bool]:
        return still_ours(self.table, self.worker_id, self.claim.token)
