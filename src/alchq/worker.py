"""The worker: claim the oldest ready task, run it, record the outcome.

Module-level functions are what the seed promised::

    from alchq import worker

    worker.process_one(MyTask)        # at most one task, never waits
    worker.process_n(MyTask, 10)      # 10 tasks, waiting for new ones
    worker.process_forever(MyTask)    # until Ctrl-C / SIGTERM
    worker.process_all(MyTask)        # every ready task, then returns

Each takes ``session_factory=`` (a sessionmaker, scoped_session or
Flask-SQLAlchemy ``db``) or ``engine=``; inside a Flask app context with
Flask-SQLAlchemy neither is needed.

Transactions per task (no lock is held while ``run()`` runs)::

    1. claim    UPDATE ... SET status=PROCESSING, owner, attempts+1   COMMIT
    2. run      load the row, task.run(); flush run()'s changes
    3. record   UPDATE ... SET status=PROCESSED WHERE still ours      COMMIT (with 2)
       or, when run() raised: ROLLBACK run()'s changes;
                UPDATE ... SET status=ERROR, error columns            COMMIT
                task.error(exc)                                       COMMIT
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from sqlalchemy import Connection, Engine, inspect
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.orm.attributes import set_committed_value

from alchq._dialects import Dialect, dialect_for, utc_now
from alchq._dialects.base import Claim
from alchq._sessions import SessionSource, resolve
from alchq._util import first_line, safe_url
from alchq.config import Settings
from alchq.exceptions import DatabaseUnreachableError, TableMissingError
from alchq.model import BaseQueue, Status, check_task_model, metadata

__all__ = [
    "Worker",
    "process_all",
    "process_forever",
    "process_n",
    "process_one",
]

logger = logging.getLogger("alchq.worker")

#: Longest error message and traceback kept on a row (MySQL TEXT holds 64 KiB).
_MAX_MESSAGE = 4_000
_MAX_TRACEBACK = 60_000


@dataclass(frozen=True)
class Outcome:
    """What happened to one run, as plain data, before it is persisted."""

    status: Status
    exc: BaseException | None = None
    traceback: str | None = None

    def values(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            "status": self.status,
            "alchq_finished_at": utc_now(),
            "time_updated": utc_now(),
            "alchq_error_type": None,
            "alchq_error_message": None,
            "alchq_traceback": None,
        }
        if self.exc is not None:
            cls = type(self.exc)
            name = (
                cls.__qualname__
                if cls.__module__ == "builtins"
                else f"{cls.__module__}.{cls.__qualname__}"
            )
            values["alchq_error_type"] = name[:255]
            values["alchq_error_message"] = str(self.exc)[:_MAX_MESSAGE]
            values["alchq_traceback"] = (self.traceback or "")[-_MAX_TRACEBACK:]
        return values


def _label(model: type[BaseQueue], claim: Claim) -> str:
    key = claim.pk[0] if len(claim.pk) == 1 else claim.pk
    return f"{model.__name__} {key}"


def _is_connection_error(exc: BaseException) -> bool:
    return isinstance(exc, (OperationalError, InterfaceError)) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )


class Worker:
    """Processes tasks of one or more models.

    :param models: the BaseQueue models to serve, tried in order each round.
    :param session_factory: a ``sessionmaker``, ``scoped_session``, Flask-SQLAlchemy
        ``db`` or any callable returning a Session.
    :param engine: an Engine, instead of ``session_factory``.
    :param poll_interval: seconds to sleep when no task is ready.
    :param name: this worker's id as recorded on the rows it claims
        (default ``host:pid:random``).

    Example::

        Worker(MyTask, engine=engine).run()
    """

    def __init__(
        self,
        *models: type[BaseQueue],
        session_factory: Any = None,
        engine: Engine | None = None,
        poll_interval: float | None = None,
        settings: Settings | None = None,
        name: str | None = None,
    ) -> None:
        if not models:
            raise TypeError("Worker needs at least one BaseQueue model")
        self.models = [check_task_model(m) for m in models]
        self.source: SessionSource = resolve(session_factory, engine)
        self.settings = settings or Settings.load(
            {"poll_interval": poll_interval}, app_config=self.source.app_config
        )
        self.id = name or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._stop = threading.Event()
        self._dialects: dict[Engine, Dialect] = {}
        self._connected = False

    # -- control -------------------------------------------------------------

    def stop(self) -> None:
        """Ask the worker to stop after the task in hand (thread- and signal-safe)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- public loops ----------------------------------------------------------

    def process_one(self) -> BaseQueue | None:
        """Claim and run at most one ready task; return it, or None. Never waits."""
        for model in self.models:
            claimed, task = self._process(model, keep=True)
            if claimed:
                return task
        return None

    def process_all(self) -> int:
        """Process every ready task (including ones created meanwhile); return how many."""
        return self._loop(limit=None, wait=False)

    def process_n(self, n: int) -> int:
        """Process ``n`` tasks, waiting for new ones when none is ready; return how many."""
        if n < 0:
            raise ValueError("n must be >= 0")
        return self._loop(limit=n, wait=True)

    def run(self) -> None:
        """Process tasks until stopped by :meth:`stop`, SIGTERM or Ctrl-C."""
        self._loop(limit=None, wait=True)

    # -- the loop --------------------------------------------------------------

    def _loop(self, limit: int | None, wait: bool) -> int:
        done = 0
        failures = 0
        with self._signals_stop_worker(install=wait):
            while not self.stopping and (limit is None or done < limit):
                progressed = False
                try:
                    for model in self.models:
                        if self.stopping or (limit is not None and done >= limit):
                            break
                        claimed, _task = self._process(model, keep=False)
                        if claimed:
                            done += 1
                            progressed = True
                    failures = 0
                except (DatabaseUnreachableError, OperationalError, InterfaceError) as exc:
                    # Unreachable at start is a configuration problem: say so and
                    # stop. Once running, an outage is waited out, never fatal.
                    if not self._connected:
                        raise
                    failures += 1
                    delay = min(self.settings.max_backoff, 0.25 * 2**failures)
                    logger.warning("database error, retrying in %.1fs: %s", delay, first_line(exc))
                    self._stop.wait(delay)
                    continue
                if not progressed:
                    if not wait:
                        break
                    self._stop.wait(self.settings.poll_interval)
        return done

    @contextlib.contextmanager
    def _signals_stop_worker(self, install: bool) -> Iterator[None]:
        """First SIGINT/SIGTERM: finish the task in hand, then return. Second: interrupt."""
        if not install or threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: FrameType | None) -> None:
            if self.stopping:
                raise KeyboardInterrupt
            logger.info(
                "%s received, stopping after the current task (again to interrupt)",
                signal.Signals(signum).name,
            )
            self.stop()

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    # -- one task ----------------------------------------------------------------

    def _process(self, model: type[BaseQueue], keep: bool) -> tuple[bool, BaseQueue | None]:
        """Claim and run one task of ``model``: (whether one was claimed, the task)."""
        session = self.source.open()
        task: BaseQueue | None = None
        try:
            claim = self._claim(session, model)
            if claim is None:
                return False, None
            task = self._execute(session, model, claim)
            return True, task
        except BaseException:
            session.rollback()
            raise
        finally:
            if not keep:
                self.source.release(session)
            elif self.source.scoped is None:
                self._detach(session, task)

    def _detach(self, session: Session, task: BaseQueue | None) -> None:
        """Close a private session, leaving ``task`` readable without it."""
        try:
            if task is not None and task in session and inspect(task).expired_attributes:
                # close() ends the read transaction without expiring what it loaded
                # (a commit would expire it again under expire_on_commit).
                session.refresh(task)
        finally:
            session.close()

    def _connection(self, session: Session, mapper: Mapper[Any]) -> Connection:
        return session.connection(bind_arguments={"mapper": mapper})

    def _dialect(self, engine: Engine) -> Dialect:
        dialect = self._dialects.get(engine)
        if dialect is None:
            dialect = self._dialects[engine] = dialect_for(engine)
            dialect.prepare_engine(engine)
        return dialect

    def _engine(self, session: Session, mapper: Mapper[Any]) -> Engine:
        bind = session.get_bind(mapper=mapper)
        return bind if isinstance(bind, Engine) else bind.engine

    def _claim(self, session: Session, model: type[BaseQueue]) -> Claim | None:
        mapper = inspect(model)
        engine = self._engine(session, mapper)
        table = mapper.local_table
        c = table.c
        try:
            dialect = self._dialect(engine)
            claims = dialect.claim(
                self._connection(session, mapper),
                table,
                ready=c.status == Status.PENDING,
                order_by=[c.time_created, *table.primary_key.columns],
                values={
                    "status": Status.PROCESSING,
                    "alchq_worker": self.id,
                    "alchq_attempts": c.alchq_attempts + 1,
                    "alchq_started_at": utc_now(),
                    "alchq_finished_at": None,
                    "time_updated": utc_now(),
                },
                token_column="alchq_attempts",  # noqa: S106 - not a password
                limit=1,
            )
            session.commit()
        except DBAPIError as exc:
            session.rollback()
            raise self._diagnose(exc, model, engine) from exc
        self._connected = True
        return claims[0] if claims else None

    def _diagnose(self, exc: DBAPIError, model: type[BaseQueue], engine: Engine) -> Exception:
        """Turn a failed claim into a clear error: unreachable, table missing, or as is."""
        if _is_connection_error(exc):
            try:
                with engine.connect() as conn:
                    conn.exec_driver_sql("SELECT 1")
            except DBAPIError as again:
                return DatabaseUnreachableError(
                    f"cannot reach the database {safe_url(engine)}: {first_line(again)}"
                )
        table = inspect(model).local_table
        try:
            exists = inspect(engine).has_table(table.name, schema=table.schema)
        except DBAPIError:
            exists = True
        if not exists:
            if table.metadata is metadata:
                command = "flask alchq" if self.source.scoped is not None else "alchq"
                how = (
                    f"`{command} create-tables {model.__module__}:{model.__qualname__}`"
                    " or alchq.metadata.create_all(engine)"
                )
            else:
                how = "your app's metadata.create_all() (db.create_all()) or an Alembic migration"
            return TableMissingError(
                f"table {table.name!r} for {model.__name__} does not exist in "
                f"{safe_url(engine)}: create it with {how}"
            )
        return exc

    def _execute(self, session: Session, model: type[BaseQueue], claim: Claim) -> BaseQueue | None:
        label = _label(model, claim)
        logger.info(
            "%s started (attempt %d)",
            label,
            claim.token,
            extra={
                "alchq_model": model.__name__,
                "alchq_task_id": claim.pk,
                "alchq_attempt": claim.token,
            },
        )
        started = time.monotonic()
        key = claim.pk[0] if len(claim.pk) == 1 else claim.pk
        try:
            task = session.get(model, key, populate_existing=True)
        except Exception as exc:  # a row whose columns cannot be loaded
            session.rollback()
            self._record(
                session, model, claim, Outcome(Status.ERROR, exc, traceback.format_exc()), None
            )
            self._log_end(
                label, Status.ERROR, started, f"row could not be loaded: {first_line(exc)}"
            )
            return None
        if task is None:
            session.rollback()
            logger.warning("%s was deleted after it was claimed; skipped", label)
            return None
        try:
            task.run()
            self._keep_status(task)
            session.flush()
        except BaseException as exc:
            # Everything run() raises ends the task, Ctrl-C and sys.exit() included;
            # then non-Exceptions are re-raised so the worker can stop.
            tb = traceback.format_exc()
            session.rollback()
            if self._record(session, model, claim, Outcome(Status.ERROR, exc, tb), task):
                self._log_end(label, Status.ERROR, started, f"{type(exc).__name__}: {exc}")
                self._call_error(session, task, exc, label)
            if not isinstance(exc, Exception):
                raise
            return task
        if self._record(session, model, claim, Outcome(Status.PROCESSED), task):
            self._log_end(label, Status.PROCESSED, started)
        return task

    @staticmethod
    def _keep_status(task: BaseQueue) -> None:
        """The worker owns ``status``: drop a change run() made to it."""
        history = inspect(task).attrs.status.history
        if history.has_changes():
            set_committed_value(task, "status", Status.PROCESSING)

    def _record(
        self,
        session: Session,
        model: type[BaseQueue],
        claim: Claim,
        outcome: Outcome,
        task: BaseQueue | None,
    ) -> bool:
        """Commit ``outcome`` (with what run() flushed) if the claim is still ours."""
        mapper = inspect(model)
        table = mapper.local_table
        c = table.c
        values = outcome.values()
        still_ours = (
            (c.status == Status.PROCESSING)
            & (c.alchq_worker == self.id)
            & (c.alchq_attempts == claim.token)
        )
        conn = self._connection(session, mapper)
        dialect = self._dialect(conn.engine)
        if not dialect.finish(conn, table, claim, still_ours, values):
            session.rollback()
            logger.warning(
                "%s: this worker no longer holds the claim; its outcome (%s) was discarded",
                _label(model, claim),
                outcome.status.value,
            )
            return False
        session.commit()
        if task is not None:
            for key in ("status", "alchq_error_type", "alchq_error_message", "alchq_traceback"):
                set_committed_value(task, key, values[key])
            session.expire(task, ["alchq_finished_at", "time_updated"])
        return True

    def _call_error(
        self, session: Session, task: BaseQueue, exc: BaseException, label: str
    ) -> None:
        try:
            task.error(exc)
            session.commit()
        except Exception as err:
            session.rollback()
            logger.error("%s: error() raised %s: %s", label, type(err).__name__, err)
            logger.debug("error() traceback", exc_info=True)

    @staticmethod
    def _log_end(label: str, status: Status, started: float, detail: str | None = None) -> None:
        duration = time.monotonic() - started
        extra = {"alchq_outcome": status.value, "alchq_duration": duration}
        if detail is None:
            logger.info("%s %s in %.3fs", label, status.value, duration, extra=extra)
        else:
            # A failed task is worth a look, but it is not the worker's error.
            logger.warning("%s %s in %.3fs: %s", label, status.value, duration, detail, extra=extra)


def _models(model: type[BaseQueue] | Sequence[type[BaseQueue]]) -> tuple[type[BaseQueue], ...]:
    # Only a list or tuple means several models; anything else is checked as
    # one model, so a task instance or a string gets a clear TaskDefinitionError.
    if isinstance(model, (list, tuple)):
        return tuple(model)
    return (model,)  # type: ignore[return-value]  # checked by Worker


def process_one(
    model: type[BaseQueue] | Sequence[type[BaseQueue]],
    *,
    session_factory: Any = None,
    engine: Engine | None = None,
) -> BaseQueue | None:
    """Claim and run at most one ready task; return it, or None when none is ready.

    Never waits. Example: ``task = worker.process_one(MyTask, engine=engine)``.
    """
    return Worker(*_models(model), session_factory=session_factory, engine=engine).process_one()


def process_n(
    model: type[BaseQueue] | Sequence[type[BaseQueue]],
    n: int,
    *,
    session_factory: Any = None,
    engine: Engine | None = None,
    poll_interval: float | None = None,
) -> int:
    """Process ``n`` tasks, waiting for new ones as :func:`process_forever` does.

    Returns the number processed: ``n``, or fewer if stopped by a signal.
    """
    return Worker(
        *_models(model), session_factory=session_factory, engine=engine, poll_interval=poll_interval
    ).process_n(n)


def process_forever(
    model: type[BaseQueue] | Sequence[type[BaseQueue]],
    *,
    session_factory: Any = None,
    engine: Engine | None = None,
    poll_interval: float | None = None,
) -> None:
    """Process tasks until stopped: Ctrl-C or SIGTERM finishes the task in hand and returns."""
    Worker(
        *_models(model), session_factory=session_factory, engine=engine, poll_interval=poll_interval
    ).run()


def process_all(
    model: type[BaseQueue] | Sequence[type[BaseQueue]],
    *,
    session_factory: Any = None,
    engine: Engine | None = None,
) -> int:
    """Process every ready task, including those created meanwhile; return how many."""
    return Worker(*_models(model), session_factory=session_factory, engine=engine).process_all()
