"""The supervisor's side of each worker process: what it holds, kept alive and kept in time.

A worker process tells its supervisor (see :mod:`alchq._link`) which worker ids
it runs and which task each holds. The supervisor, a process the task cannot
starve, then

- renews those workers' registry rows every heartbeat (while the process is
  not stopped), so a task holding the interpreter is never taken over;
- sends SIGALRM when a task reaches its time limit (an interpreter stuck in C
  code that checks for signals, as ``re`` does, is interrupted by it);
- when the task still runs ``kill_after`` later, kills the process, records
  the timeout (the model's retry policy applies) and starts a new process,
  which calls error() for it;
- when a process dies holding tasks, ends their leases at once and has the
  new process take them over: no waiting for the lease.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table, delete, select, update
from sqlalchemy.exc import DBAPIError

from alchq._binds import Binds
from alchq._dialects import Claim, utc_now
from alchq._held import Held
from alchq._liveness import is_stopped
from alchq._monitor import Monitor
from alchq._outcome import RELEASE, failed
from alchq._recorder import Recorder
from alchq._registry import Place, Registry, renew
from alchq._sessions import SessionSource
from alchq._util import first_line
from alchq.config import Settings
from alchq.exceptions import TaskTimeoutError
from alchq.model import BaseQueue, Status, task_table, workers_table

logger = logging.getLogger("alchq.pool")

#: After kill_after, the supervisor waits this much more before acting, so a
#: worker that can still act on its own (replace itself) does so first.
MARGIN = 0.25


@dataclass
class Kept:
    """A task a worker process holds, as its supervisor sees it."""

    worker_id: str
    model: type[BaseQueue]
    pk: list[str]
    token: int
    phase: str
    limit: float
    alarm: bool
    since: float = field(default_factory=time.monotonic)
    alarmed: bool = False


@dataclass
class Child:
    """One worker process: its pipe, its workers, what they hold."""

    pid: int
    fd: int
    ids: set[str] = field(default_factory=set)
    held: dict[str, Kept] = field(default_factory=dict)
    buffer: bytes = b""
    #: monotonic time it was told to stop now, if it was
    stop_now_at: float | None = None
    killed: bool = False


class Keeper:
    """Keeps the worker processes of one supervisor."""

    def __init__(
        self, models: list[type[BaseQueue]], source: SessionSource, settings: Settings
    ) -> None:
        self.models = {f"{m.__module__}:{m.__qualname__}": m for m in models}
        self.settings = settings
        self.binds = Binds(source)
        self._registry = Registry("supervisor", self.binds, settings, models)
        self._places: list[Place] | None = None
        self.recorder = Recorder(
            self.binds,
            Monitor(lambda: None, settings.heartbeat_interval, _ignore, _ignore),
            settings,
            aborted=lambda: True,
        )
        self._next_beat = 0.0
        self._failing = False

    # -- pipes -------------------------------------------------------------------------

    @staticmethod
    def pipe() -> tuple[int, int]:
        """(read end for the supervisor, write end for the child)."""
        read, write = os.pipe()
        flags = fcntl.fcntl(read, fcntl.F_GETFL)
        fcntl.fcntl(read, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        os.set_inheritable(write, True)
        return read, write

    def read(self, child: Child) -> None:
        """Take in what the child said since the last look."""
        while True:
            try:
                chunk = os.read(child.fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                break
            if not chunk:
                break
            child.buffer += chunk
        *lines, child.buffer = child.buffer.split(b"\n")
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self._event(child, event)

    def _event(self, child: Child, event: dict[str, Any]) -> None:
        op, worker_id = event.get("op"), str(event.get("id"))
        if op == "hello":
            child.ids.add(worker_id)
        elif op == "bye":
            child.ids.discard(worker_id)
            child.held.pop(worker_id, None)
        elif op == "hold":
            model = self.models.get(str(event.get("model")))
            if model is None:
                return
            child.ids.add(worker_id)
            child.held[worker_id] = Kept(
                worker_id=worker_id,
                model=model,
                pk=[str(v) for v in event.get("pk", [])],
                token=int(event.get("token", 0)),
                phase=str(event.get("phase", "run")),
                limit=float(event.get("limit", 3600.0)),
                alarm=bool(event.get("alarm")),
            )
        elif op == "drop":
            child.held.pop(worker_id, None)

    # -- each tick ------------------------------------------------------------------------

    def tick(self, children: list[Child]) -> None:
        """Heartbeats, time limits and stops of the live children."""
        now = time.monotonic()
        for child in children:
            self.read(child)
        if now >= self._next_beat:
            self._next_beat = now + self.settings.heartbeat_interval
            self._heartbeat([c for c in children if not c.killed])
        for child in children:
            if child.killed:
                continue
            if child.stop_now_at is not None and (
                now - child.stop_now_at >= self.settings.kill_after + 1.0
            ):
                logger.error(
                    "worker process (pid %d) did not stop when told to; killing it", child.pid
                )
                self._kill(child)
                for kept in list(child.held.values()):
                    self._end(kept, None)
                continue
            for kept in list(child.held.values()):
                over = now - kept.since - kept.limit
                if over >= 0 and kept.alarm and not kept.alarmed:
                    kept.alarmed = True
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signal.SIGALRM)
                if over >= self.settings.kill_after + MARGIN:
                    self._time_out(child, kept)
                    break

    def _heartbeat(self, children: list[Child]) -> None:
        ids = [i for c in children if not is_stopped(c.pid) for i in c.ids]
        if not ids:
            return
        try:
            if self._places is None:
                self._places = self._registry.places()
            renew(self.binds, self._places, ids, self.settings.lease)
        except Exception as exc:
            if not self._failing:
                # Its workers say it too, once: here only in debug.
                logger.debug("supervisor heartbeat failed: %s", first_line(exc))
            self._failing = True
            return
        self._failing = False

    def _time_out(self, child: Child, kept: Kept) -> None:
        what = kept.phase == "run" and "task" or "error()"
        logger.error(
            "%s %s of %s could not be interrupted after its time limit of %gs; "
            "replacing its worker process (pid %d)",
            kept.model.__name__,
            ", ".join(kept.pk),
            what,
            kept.limit,
            child.pid,
        )
        self._kill(child)
        if kept.phase == "run":
            self._end(kept, "timeout")
        # error() stopped this way keeps its lease: the new process calls it again.
        child.held.pop(kept.worker_id, None)
        for other in list(child.held.values()):
            self._end(other, None)

    def _kill(self, child: Child) -> None:
        child.killed = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)

    def _end(self, kept: Kept, why: str | None) -> None:
        """End a killed process's claim: a timeout (retried by policy, or ERROR), or released."""
        held = self._held(kept)
        if held is None:
            return
        if why == "timeout":
            exc = TaskTimeoutError(
                f"{held.label} ran longer than its time limit of {kept.limit:g}s and "
                "could not be interrupted; its worker process was replaced"
            )
            self.recorder.finish_elsewhere(held, failed(held, exc, None))
        else:
            self.recorder.finish_elsewhere(held, RELEASE)

    def _held(self, kept: Kept) -> Held | None:
        """The held task as stored: its key typed by the database, its counters."""
        table = task_table(kept.model)
        c = table.c
        pk_cols = list(table.primary_key.columns)
        try:
            session = self.binds.source.open()
            try:
                engine = self.binds.engine(session, kept.model)
            finally:
                self.binds.source.release(session)
            with self.binds.connect(engine) as conn:
                rows = conn.execute(
                    select(*pk_cols, c.alchq_failures, c.alchq_lost_claims).where(
                        c.alchq_worker == kept.worker_id,
                        c.alchq_attempts == kept.token,
                        c.status == Status.PROCESSING,
                    )
                ).all()
        except DBAPIError as exc:
            logger.warning("could not look up a killed worker's task: %s", first_line(exc))
            return None
        n = len(pk_cols)
        for row in rows:
            if [str(v) for v in row[:n]] == kept.pk:
                held = Held(
                    model=kept.model,
                    claim=Claim(tuple(row[:n]), kept.token),
                    worker_id=kept.worker_id,
                    table=table,
                    engine=engine,
                    dialect=self.binds.dialect(engine),
                    time_limit=kept.limit,
                )
                held.failures = int(row[n] or 0)
                held.lost_claims = int(row[n + 1] or 0)
                return held
        return None

    # -- a child is gone -------------------------------------------------------------------

    def gone(self, child: Child) -> list[str]:
        """A child ended: its workers' claims are lost at once. The ids its replacement adopts."""
        with contextlib.suppress(OSError):
            os.close(child.fd)
        ids = sorted(child.ids)
        if not ids:
            return []
        try:
            session = self.binds.source.open()
            try:
                for model in self.models.values():
                    table: Table = task_table(model)
                    engine = self.binds.engine(session, model)
                    with self.binds.connect(engine) as conn:
                        conn.execute(
                            update(table)
                            .where(
                                table.c.alchq_worker.in_(ids),
                                table.c.alchq_lease_until.is_not(None),
                            )
                            .values(alchq_lease_until=utc_now(-1))
                        )
                        workers = workers_table(table.metadata)
                        conn.execute(delete(workers).where(workers.c.id.in_(ids)))
                        conn.commit()
            finally:
                self.binds.source.release(session)
        except DBAPIError as exc:
            logger.warning("could not end the claims of a lost worker: %s", first_line(exc))
        return ids


def _ignore(held: Held) -> None:
    """The supervisor's recorder has a monitor that never runs."""
