"""The periodic scheduler: a thread in each worker that creates periodic tasks.

Each worker serving a model with ``alchq_periodic`` schedules runs one. At
each tick, every scheduler tries to insert ``(schedule, tick)`` into the
``alchq_ticks`` table, in the same transaction as the task; its primary key
lets exactly one of them succeed, on however many machines. Ticks are
computed on the database's clock. Only the latest due tick is ever
considered, so ticks missed while no worker ran give one catch-up task.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import delete, inspect, select
from sqlalchemy.exc import DBAPIError

from alchq._binds import Binds
from alchq._dialects import UniqueKey, utc_now
from alchq._util import first_line, helper_thread
from alchq.config import Settings
from alchq.model import BaseQueue, schedules_of, task_table, ticks_table
from alchq.scheduling import Periodic

logger = logging.getLogger("alchq.scheduler")

#: Most ticks a stalled scheduler fills in at once (see Scheduler._slept_through).
MAX_FILLED = 10
#: How long a schedule's past ticks stay in ``alchq_ticks``.
TICKS_KEPT = timedelta(hours=1)


def aware(value: Any) -> datetime:
    """The database's now as an aware UTC datetime (SQLite returns text)."""
    when = datetime.fromisoformat(value[:26]) if isinstance(value, str) else value
    assert isinstance(when, datetime)
    if when.tzinfo is None:
        return when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc)


class Scheduler:
    """Creates the periodic tasks of some models, from a thread of its own.

    :param binds: how to reach the models' tables.
    :param app_context: enters the (Flask) app context the thread runs in.
    :param clock: turns the database's ``now`` as read into an aware datetime
        (tests replace it to play with time).
    """

    def __init__(
        self,
        models: Sequence[type[BaseQueue]],
        binds: Binds,
        settings: Settings,
        app_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
        clock: Callable[[Any], datetime] = aware,
    ) -> None:
        self.binds = binds
        self.settings = settings
        self.app_context = app_context
        self.clock = clock
        self.entries = [(m, p) for m in models for p in schedules_of(m)]
        self._done: dict[str, datetime] = {}  # schedule key -> last tick handled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self._refused: set[str] = set()  # schedule keys whose task the database refuses
        self._checked_at: datetime | None = None  # database time of the last check

    def __bool__(self) -> bool:
        return bool(self.entries)

    def start(self) -> None:
        """One pass now (so a burst run sees due ticks), then the thread."""
        if not self.entries or self._thread is not None:
            return
        self._stop.clear()
        wait = self.check_safely()
        self._thread = helper_thread(self._loop, "alchq-scheduler", wait)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _loop(self, wait: float) -> None:
        with self.app_context():
            while not self._stop.wait(wait):
                wait = self.check_safely()

    def check_safely(self) -> float:
        """:meth:`check`, logging failures once per outage; seconds until the next check."""
        try:
            wait = self.check()
        except Exception as exc:
            transient = isinstance(exc, DBAPIError) and self.binds.is_transient(exc)
            if not self._failing:
                log = logger.warning if transient else logger.error
                log("periodic scheduler: %s; retrying", first_line(exc))
                logger.debug("scheduler traceback", exc_info=True)
            self._failing = True
            return min(self.settings.max_backoff, 1.0)
        if self._failing:
            logger.info("periodic scheduler: working again")
        self._failing = False
        return wait

    def check(self) -> float:
        """Create the task of each schedule's latest due tick unless done; return the
        seconds until the next tick."""
        # When to check next, on time.monotonic(): counted from when the database's
        # clock was read, so a slow check (a lock wait, a busy CPU) does not push
        # the next check past the next tick as well.
        deadline = time.monotonic() + 60.0
        source = self.binds.source
        session = source.open()
        try:
            now_by_engine: dict[Any, tuple[datetime, float]] = {}
            for model, periodic in self.entries:
                table = task_table(model)
                engine = self.binds.engine(session, model)
                self.binds.dialect(engine)  # connect-time settings, error classification
                cached = now_by_engine.get(engine)
                if cached is None:
                    conn = self.binds.connection(session, model, bookkeeping=True)
                    raw = conn.execute(select(utc_now())).scalar_one()
                    cached = now_by_engine[engine] = (self.clock(raw), time.monotonic())
                    session.rollback()
                now, read_at = cached
                until_next = read_at + (periodic.next_tick(now) - now).total_seconds()
                key = periodic.key(table.name)
                tick = periodic.last_tick(now)
                previous = self._done.get(key)
                if previous != tick:
                    late = (now - tick).total_seconds()
                    if periodic.catch_up or late <= periodic.late_after:
                        slept = self._slept_through(periodic, previous, tick, now)
                        if not all(
                            self.create_or_report(session, model, periodic, key, t)
                            for t in [*slept, tick]
                        ):
                            # Not marked done: tried again at the next check,
                            # without holding up the other schedules.
                            deadline = min(deadline, until_next)
                            continue
                    else:
                        logger.info(
                            "%s: skipped tick %s of %r (%.0fs late, catch_up=False)",
                            model.__name__,
                            tick.isoformat(),
                            periodic.spec,
                            late,
                        )
                    self._done[key] = tick
                deadline = min(deadline, until_next)
            if now_by_engine:
                self._checked_at = min(now for now, _ in now_by_engine.values())
        finally:
            with contextlib.suppress(Exception):
                source.release(session)
        return max(0.01, deadline - time.monotonic() + 0.005)

    def _slept_through(
        self, periodic: Periodic, previous: datetime | None, tick: datetime, now: datetime
    ) -> list[datetime]:
        """Ticks a running scheduler slept through (a slow database, a busy machine)
        since the last one it handled: still created if at most ``late_after`` late,
        and at most :data:`MAX_FILLED` of them. After a longer gap (no scheduler
        ran, or this one was frozen) they collapse into the one catch-up task of
        ``tick``."""
        checked = self._checked_at
        if previous is None or checked is None:
            return []
        if (now - checked).total_seconds() > periodic.late_after:
            return []
        earliest = now - timedelta(seconds=periodic.late_after)
        t = periodic.next_tick(max(previous, earliest - timedelta(microseconds=1)))
        slept: list[datetime] = []
        while t < tick:
            slept.append(t)
            t = periodic.next_tick(t)
        return slept[-MAX_FILLED:]

    def create_or_report(
        self, session: Any, model: type[BaseQueue], periodic: Periodic, key: str, tick: datetime
    ) -> bool:
        """:meth:`create`; False, logged once per schedule, if the database refuses it
        (a constraint, a missing table). An outage is raised: check_safely waits it out."""
        try:
            self.create(session, model, periodic, key, tick)
        except Exception as exc:
            if isinstance(exc, DBAPIError) and self.binds.is_transient(exc):
                raise
            if key not in self._refused:
                self._refused.add(key)
                logger.error(
                    "%s: schedule %r cannot create its task: %s; retrying",
                    model.__name__,
                    periodic.spec,
                    first_line(exc),
                )
                logger.debug("scheduler traceback", exc_info=True)
            return False
        if key in self._refused:
            self._refused.discard(key)
            logger.info("%s: schedule %r creates tasks again", model.__name__, periodic.spec)
        return True

    def create(
        self, session: Any, model: type[BaseQueue], periodic: Periodic, key: str, tick: datetime
    ) -> None:
        """Create ``tick``'s task of ``periodic`` unless another scheduler did (committed)."""
        table = task_table(model)
        ticks = ticks_table(table.metadata)
        dialect = self.binds.dialect_of(session, model)
        try:
            conn = self.binds.connection(session, model, bookkeeping=True)
            primary = UniqueKey(str(ticks.primary_key.name), (ticks.c.schedule, ticks.c.tick))
            row = {"schedule": key, "tick": tick}
            won = dialect.insert_one_unless_conflict(conn, ticks, row, primary) is not None
            if won:
                # A scheduler that read the clock before a later tick can get here
                # after another one created that later tick's task and deleted this
                # tick's row (below): then this tick's task may exist already.
                # (Only a tick row far enough ahead for this one's to have been
                # deleted counts: nearer ones are the ticks a stalled scheduler
                # fills in after the fact.)
                ahead = tick + TICKS_KEPT / 2
                later = select(ticks.c.tick).where(ticks.c.schedule == key, ticks.c.tick > ahead)
                won = conn.execute(later.limit(1)).first() is None
            if not won:
                session.rollback()  # another worker created this (or a later) tick's task
                return
            task = model(**periodic.values)
            session.add(task)
            session.flush()
            # Old ticks go, but only an hour behind: a scheduler that read the
            # clock long ago and inserts a stale tick late then still conflicts
            # with that tick's row (or sees the later ones above).
            stale = tick - TICKS_KEPT
            conn.execute(delete(ticks).where(ticks.c.schedule == key, ticks.c.tick < stale))
            ident = inspect(task).identity
            session.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                session.rollback()
            raise
        label = ident[0] if ident is not None and len(ident) == 1 else ident
        logger.info(
            "%s %s created by schedule %r for %s",
            model.__name__,
            label,
            periodic.spec,
            tick.isoformat(),
            extra={"alchq_model": model.__name__, "alchq_schedule": key},
        )
