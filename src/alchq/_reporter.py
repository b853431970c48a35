"""The task in hand's progress, written beside it; and requests to cancel it, read.

``task.alchq_progress()`` only notes the latest value (:meth:`Reporter.report`,
the task's thread). The monitor thread writes it about once a second on a
connection of alchq's own (:meth:`Reporter.tick`), and once more when run()
ends (:meth:`Reporter.end`). Every write is fenced like the outcome's: it
lands only while the task is PROCESSING under this worker's claim.

Never waiting on run(): the row written is the task's row in
``alchq_progress``, not the task's own row (which run()'s transaction may
lock), and each write gives up on a lock at once. On SQLite a run() that has
written holds the whole file: its progress waits in memory until the end of
the run, and the last value is then written in run()'s own transaction, with
its outcome.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    case,
    exists,
    insert,
    inspect,
    literal,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError

from alchq._binds import Binds
from alchq._dialects import utc_now
from alchq._held import Held
from alchq._util import first_line
from alchq.model import key_text, progress_table

logger = logging.getLogger("alchq.worker")

#: Seconds between two progress writes of one task (a tight loop cannot flood).
WRITE_INTERVAL = 1.0
#: Seconds between two looks for a cancel request of the task in hand.
CANCEL_CHECK = 1.0
#: A progress write gives up on a lock after this long (seconds).
LOCK_WAIT = 0.01


class Reporter:
    """Progress and cancel requests of one worker's task in hand."""

    def __init__(self, binds: Binds) -> None:
        self.binds = binds
        self._lock = threading.Lock()
        self._held: Held | None = None
        self._value: tuple[float | None, str | None] | None = None
        self._dirty = False
        self._written = 0.0
        self._checked = 0.0
        #: Databases without the alchq_progress table (said once, then skipped).
        self._missing: set[Engine] = set()
        self._present: set[Engine] = set()

    def begin(self, held: Held) -> None:
        """A task's run() starts (its thread)."""
        with self._lock:
            self._held, self._value, self._dirty = held, None, False
            self._written = 0.0
            self._checked = time.monotonic()

    def report(self, task: object, fraction: float | None, message: str | None) -> None:
        """run() said how far it is (its thread): noted, written later."""
        if self._held is not None:
            self._value, self._dirty = (fraction, message), True

    def tick(self, held: Held) -> bool:
        """The monitor thread's turn: write due progress; True if the task was asked to stop."""
        now = time.monotonic()
        if self._dirty and now - self._written >= WRITE_INTERVAL:
            with self._lock:
                if self._held is held:
                    self._write(held, None)
        if self._held is not held or now - self._checked < CANCEL_CHECK:
            return False  # run() is over, or has just begun
        self._checked = now
        return self._cancel_requested(held)

    def end(self, held: Held, own: Callable[[], Connection] | None) -> None:
        """run() returned or raised (its thread): write its last progress now.

        ``own``: run()'s transaction's connection, for when the side connection
        cannot write (SQLite, once run() has written): then the value is written
        there and committed with the outcome.
        """
        with self._lock:
            if self._held is held and self._dirty:
                self._write(held, own)
            self._held, self._value, self._dirty = None, None, False

    def _write(self, held: Held, own: Callable[[], Connection] | None) -> None:
        if held.engine in self._missing or self._value is None:
            return
        self._dirty = False  # first: a report() from now on is written next time
        fraction, message = self._value
        self._written = time.monotonic()
        try:
            with self.binds.connect(held.engine) as conn:
                with held.dialect.short_lock_wait(conn, LOCK_WAIT):
                    written = _upsert(conn, held, fraction, message)
                if written:
                    conn.commit()
                else:
                    conn.rollback()
        except Exception as exc:  # progress must never fail the task: say it, go on
            if not isinstance(exc, DBAPIError):
                self._dirty = own is None
                logger.debug("%s: progress not written: %s", held.label, first_line(exc))
                return
            # A lock (SQLite: run() has written) or a blip: in run()'s own
            # transaction at the end, else at the next tick.
            if own is not None and self._write_in_run(held, own, fraction, message):
                return
            if not self._table_missing(held):
                self._dirty = own is None
                logger.debug("%s: progress not written yet: %s", held.label, first_line(exc))
            return
        if not written:
            logger.debug("%s: progress not written: the claim is no longer ours", held.label)

    def _write_in_run(
        self,
        held: Held,
        own: Callable[[], Connection],
        fraction: float | None,
        message: str | None,
    ) -> bool:
        try:
            conn = own()
            with conn.begin_nested():
                _upsert(conn, held, fraction, message)
        except Exception as exc:
            logger.debug("%s: last progress not written: %s", held.label, first_line(exc))
            return False
        return True

    def _table_missing(self, held: Held) -> bool:
        if held.engine in self._present:
            return False
        table = progress_table(held.table.metadata)
        try:
            if inspect(held.engine).has_table(table.name, schema=table.schema):
                self._present.add(held.engine)
                return False
        except DBAPIError:
            return False
        self._missing.add(held.engine)
        logger.warning(
            "progress of %s tasks is not recorded: the table %s is missing (create it "
            "with `alchq create-tables`, create_all() or a migration)",
            held.model.__name__,
            table.name,
        )
        return True

    def _cancel_requested(self, held: Held) -> bool:
        if held.engine in self._missing:
            return False
        notes = progress_table(held.table.metadata)
        n = notes.c
        try:
            with self.binds.connect(held.engine) as conn:
                requested = conn.execute(
                    select(n.cancel_requested_at).where(
                        n.task_table == held.table.fullname,
                        n.task_key == key_text(held.claim.pk),
                        n.attempt == held.claim.token,
                        # Made during this claim: not a request for a deleted task
                        # whose key (and attempt number) this one reuses.
                        _claim_of(held, held.table.c.alchq_started_at <= n.cancel_requested_at),
                    )
                ).scalar_one_or_none()
                conn.rollback()
        except Exception as exc:
            logger.debug("%s: could not look for a cancel request: %s", held.label, first_line(exc))
            return False
        return requested is not None


def _claim_of(held: Held, *also: ColumnElement[bool]) -> ColumnElement[bool]:
    """SQL: the task's row is still under ``held``'s claim (and ``also`` holds of it)."""
    table = held.table
    return exists(
        select(literal(1))
        .select_from(table)
        .where(
            *[col == v for col, v in zip(table.primary_key, held.claim.pk, strict=True)],
            held.still_ours(),
            *also,
        )
    )


def _upsert(conn: Connection, held: Held, fraction: float | None, message: str | None) -> bool:
    """Write the task's progress row if the claim is still ours; True if written."""
    notes = progress_table(held.table.metadata)
    n = notes.c
    table = held.table
    ours = _claim_of(held)
    key = key_text(held.claim.pk)
    token = held.claim.token
    changed = conn.execute(
        update(notes)
        .where(n.task_table == table.fullname, n.task_key == key, ours)
        .values(
            attempt=token,
            worker=held.worker_id,
            fraction=fraction,
            message=message,
            updated_at=utc_now(),
            # A request to cancel an earlier attempt is not this one's.
            cancel_requested_at=case((n.attempt == token, n.cancel_requested_at)),
        )
    ).rowcount
    if changed:
        return True
    values = select(
        literal(table.fullname),
        literal(key),
        literal(token),
        literal(held.worker_id),
        literal(fraction, type_=notes.c.fraction.type),
        literal(message, type_=notes.c.message.type),
        utc_now(),
    ).where(ours)
    columns = ["task_table", "task_key", "attempt", "worker", "fraction", "message", "updated_at"]
    try:
        inserted = conn.execute(insert(notes).from_select(columns, values)).rowcount
    except IntegrityError:  # a cancel request made the row meanwhile: updated next time
        return False
    return bool(inserted)
