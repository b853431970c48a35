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

from sqlalchemy import Connection, Engine, Table, case, event, inspect, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.orm.attributes import set_committed_value

from alchq._dialects import Dialect, dialect_for, utc_now
from alchq._dialects.base import Claim
from alchq._monitor import (
    InHand,
    Monitor,
    exit_now,
    interrupt_thread,
    lease_values,
    replace_process,
    send_alarm,
)
from alchq._prune import prune_periodically
from alchq._scheduler import Scheduler
from alchq._sessions import SessionSource, resolve
from alchq._util import first_line, safe_url
from alchq.config import Settings
from alchq.exceptions import (
    DatabaseUnreachableError,
    TableMissingError,
    TaskFailure,
    TaskTimeoutError,
    WorkerLostError,
)
from alchq.model import MAX_COUNTER, BaseQueue, Status, check_task_model, metadata
from alchq.scheduling import Snooze

__all__ = [
    "Worker",
    "WorkerShutdown",
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
    #: With status PENDING: run again in this many seconds (a retry or a snooze).
    again_in: float | None = None

    @property
    def failed(self) -> bool:
        """Does this run count as a failure (``alchq_failures``)? A snooze does not."""
        return self.exc is not None and not isinstance(self.exc, Snooze)

    def values(self, table: Table) -> dict[str, Any]:
        values: dict[str, Any] = {"status": self.status, "time_updated": utc_now()}
        if self.status is Status.PENDING:
            values.update(_released())
            values["run_at"] = utc_now(self.again_in or 0.0)
        else:
            values["alchq_finished_at"] = utc_now()
        if self.failed:
            assert self.exc is not None
            cls = type(self.exc)
            name = (
                cls.__qualname__
                if cls.__module__ == "builtins"
                else f"{cls.__module__}.{cls.__qualname__}"
            )
            values["alchq_failures"] = _bump(table.c.alchq_failures)
            values["alchq_error_type"] = name[:255]
            values["alchq_error_message"] = str(self.exc)[:_MAX_MESSAGE]
            values["alchq_traceback"] = (self.traceback or "")[-_MAX_TRACEBACK:]
        elif self.status is Status.PROCESSED:
            values.update(alchq_error_type=None, alchq_error_message=None, alchq_traceback=None)
        return values


def _released() -> dict[str, Any]:
    """Column values that put a claimed task back to PENDING, unowned."""
    return {
        "status": Status.PENDING,
        "alchq_worker": None,
        "alchq_lease_until": None,
        "time_updated": utc_now(),
    }


def _bump(counter: Any) -> Any:
    """``counter + 1``, but never past the CHECK constraint's bound (a hand-edited row)."""
    return case((counter < MAX_COUNTER, counter + 1), else_=MAX_COUNTER)


def _label(model: type[BaseQueue], claim: Claim) -> str:
    key = claim.pk[0] if len(claim.pk) == 1 else claim.pk
    return f"{model.__name__} {key}"


class WorkerShutdown(BaseException):  # noqa: N818 - a control-flow signal, like SystemExit
    """Raised into ``run()`` when the worker must stop now (second signal, grace expired).

    A BaseException so that a task's ``except Exception`` does not swallow it.
    """


#: Exit status of a worker stopped before the task in hand finished.
EXIT_INTERRUPTED = 1


@dataclass
class _Deferred:
    """An outcome the database was away for: written when it is back."""

    hand: InHand
    outcome: Outcome | None  # None: put the task back to PENDING
    had_writes: bool = False


class _WriteTracker(threading.local):
    """Notes whether a run wrote through its task's session (whose writes a lost
    connection would take with it); writes on other connections are committed
    on their own and don't count."""

    active = False
    writes = False
    dbapi_connection: Any = None


_tracker = _WriteTracker()


def _note_writes(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
    if (
        _tracker.active
        and conn.connection.dbapi_connection is _tracker.dbapi_connection
        and not statement.lstrip()[:6].upper().startswith(("SELECT", "WITH"))
    ):
        _tracker.writes = True


class Worker:
    """Processes tasks of one or more models.

    :param models: the BaseQueue models to serve, tried in order each round.
    :param session_factory: a ``sessionmaker``, ``scoped_session``, Flask-SQLAlchemy
        ``db`` or any callable returning a Session.
    :param engine: an Engine, instead of ``session_factory``.
    :param poll_interval: seconds to sleep when no task is ready.
    :param settings: a full :class:`alchq.config.Settings` (leases, grace period...).
    :param name: this worker's id as recorded on the rows it claims
        (default ``host:pid:random``).
    :param scheduler: create the models' periodic tasks (``alchq_periodic``)
        from a thread of this worker (default True).

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
        scheduler: bool = True,
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
        self._abort = False
        self._dialects: dict[Engine, Dialect] = {}
        self._connected = False
        self._deferred: _Deferred | None = None
        self._next_rescue = 0.0
        self._next_prune = 0.0
        self._grace_timer: threading.Timer | None = None
        self._app = self._current_app()
        self._monitor = Monitor(
            heartbeat=self._heartbeat,
            heartbeat_interval=self.settings.heartbeat_interval,
            on_time_limit=self._time_limit_reached,
            on_hard_deadline=self._hard_deadline_reached,
        )
        self._scheduler = Scheduler(self, self.models if scheduler else ())

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
        with self._running():
            self._settle_deferred()
            self._maybe_rescue()
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
        with self._running():
            while True:
                self._settle_deferred()
                if self.stopping or (limit is not None and done >= limit):
                    break
                progressed = False
                try:
                    self._maybe_rescue()
                    self._maybe_prune()
                    for model in self.models:
                        if self.stopping or (limit is not None and done >= limit):
                            break
                        claimed, _task = self._process(model, keep=False)
                        if claimed:
                            done += 1
                            progressed = True
                    failures = 0
                except (DatabaseUnreachableError, DBAPIError) as exc:
                    # Unreachable before the first round trip is most likely a
                    # wrong URL: say so and stop. A server that answers "starting
                    # up", and any outage once running, is waited out.
                    if not self._transient(exc) or (
                        isinstance(exc, DatabaseUnreachableError) and not self._connected
                    ):
                        raise
                    failures += 1
                    delay = min(self.settings.max_backoff, 0.25 * 2**failures)
                    log = logger.warning if failures == 1 else logger.debug
                    log("database unavailable, retrying in %.1fs: %s", delay, first_line(exc))
                    self._stop.wait(delay)
                    continue
                if not progressed:
                    if not wait:
                        break
                    self._stop.wait(self.settings.poll_interval)
        return done

    def _transient(self, exc: BaseException) -> bool:
        if isinstance(exc, DatabaseUnreachableError):
            return True
        dialects = list(self._dialects.values()) or [Dialect()]
        return any(d.is_transient(exc) for d in dialects)

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        """Signals and the monitor thread, for the duration of a public call."""
        self._monitor.start()
        try:
            self._scheduler.start()
            with self._signal_handlers():
                try:
                    yield
                except WorkerShutdown:
                    logger.warning(
                        "worker %s stopped before the task in hand finished "
                        "(it was put back to PENDING)",
                        self.id,
                    )
                    raise SystemExit(EXIT_INTERRUPTED) from None
        finally:
            if self._grace_timer is not None:
                self._grace_timer.cancel()
            self._scheduler.close()
            self._monitor.close()

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        """SIGINT/SIGTERM stop the worker gracefully; SIGALRM delivers time limits.

        Only the main thread can receive signals; elsewhere the worker relies
        on :meth:`stop` and the monitor thread.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous: dict[signal.Signals, Any] = {}

        def on_stop(signum: int, frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            hand = self._monitor.hand
            if not self.stopping:
                self.stop()
                if hand is None:
                    logger.info("%s received, stopping", name)
                    return
                logger.info(
                    "%s received: finishing %s within %.0fs, then stopping (again to stop now)",
                    name,
                    hand.label,
                    self.settings.grace_period,
                )
                self._grace_timer = threading.Timer(self.settings.grace_period, self._grace_expired)
                self._grace_timer.daemon = True
                self._grace_timer.start()
                return
            self._stop_now(hand, f"{name} received again")

        def on_alarm(signum: int, frame: FrameType | None) -> None:
            hand = self._monitor.hand
            if hand is not None and hand.interrupt == "timeout" and hand.in_run:
                hand.in_run = False  # raise once
                raise TaskTimeoutError(
                    f"{hand.label} ran longer than its time limit of {hand.time_limit:g}s"
                )
            if hand is not None and hand.interrupt == "shutdown" and hand.in_run:
                hand.in_run = False
                raise WorkerShutdown()
            chained = previous.get(signal.SIGALRM)
            if callable(chained):
                chained(signum, frame)

        for sig, handler in (
            (signal.SIGINT, on_stop),
            (signal.SIGTERM, on_stop),
            (signal.SIGALRM, on_alarm),
        ):
            previous[sig] = signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _grace_expired(self) -> None:
        hand = self._monitor.hand
        if hand is not None:
            logger.warning(
                "%s did not finish within the %.0fs grace period",
                hand.label,
                self.settings.grace_period,
            )
            self._stop_now(hand, "grace period over")

    def _stop_now(self, hand: InHand | None, why: str) -> None:
        """Stop at once: interrupt the task in hand; the monitor makes sure within kill_after."""
        self._abort = True
        self.stop()
        if hand is None:
            return
        logger.warning("%s: stopping now (%s); the task goes back to PENDING", hand.label, why)
        hand.interrupt = "shutdown"
        hand.hard_deadline = time.monotonic() + self.settings.kill_after
        if threading.get_ident() == hand.thread_id and hand.in_run:
            hand.in_run = False
            raise WorkerShutdown()
        self._interrupt(hand, WorkerShutdown)

    def _interrupt(self, hand: InHand, exc_type: type[BaseException]) -> None:
        if not hand.in_run:
            return  # between run() and its outcome: let the write finish
        if hand.thread_id == threading.main_thread().ident:
            send_alarm(hand.thread_id)
        else:
            interrupt_thread(hand.thread_id, exc_type)

    def _time_limit_reached(self, hand: InHand) -> None:
        """Monitor thread: the task overran its time limit; interrupt it."""
        logger.warning(
            "%s exceeded its time limit of %gs; interrupting it", hand.label, hand.time_limit
        )
        hand.interrupt = "timeout"
        hand.hard_deadline = time.monotonic() + self.settings.kill_after
        self._interrupt(hand, TaskTimeoutError)

    def _hard_deadline_reached(self, hand: InHand) -> None:
        """Monitor thread: the task did not stop when interrupted; end the process."""
        if hand.interrupt == "timeout":
            exc = TaskTimeoutError(
                f"{hand.label} ran longer than its time limit of {hand.time_limit:g}s and "
                "could not be interrupted; its worker process was replaced"
            )
            logger.error("%s could not be interrupted; replacing the worker process", hand.label)
            with self._app_context():
                self._finish_elsewhere(hand, self._failure(hand, exc, None), call_error=True)
            replace_process()
        else:
            logger.error("%s could not be interrupted; exiting now", hand.label)
            self._finish_elsewhere(hand, None, call_error=False)
            exit_now(EXIT_INTERRUPTED)

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
            with contextlib.suppress(Exception):
                session.rollback()
            raise
        finally:
            if not keep:
                with contextlib.suppress(Exception):
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
        except DBAPIError:
            pass  # the database went away; the task object stays as it was
        finally:
            session.close()

    def _connection(self, session: Session, mapper: Mapper[Any]) -> Connection:
        return session.connection(bind_arguments={"mapper": mapper})

    def _dialect(self, engine: Engine) -> Dialect:
        dialect = self._dialects.get(engine)
        if dialect is None:
            dialect = self._dialects[engine] = dialect_for(engine)
            dialect.prepare_engine(engine)
            if not event.contains(engine, "before_cursor_execute", _note_writes):
                event.listen(engine, "before_cursor_execute", _note_writes)
        return dialect

    def _engine(self, session: Session, mapper: Mapper[Any]) -> Engine:
        bind = session.get_bind(mapper=mapper)
        return bind if isinstance(bind, Engine) else bind.engine

    def _claim_values(self, **extra: Any) -> dict[str, Any]:
        return {
            "status": Status.PROCESSING,
            "alchq_worker": self.id,
            "alchq_started_at": utc_now(),
            "alchq_finished_at": None,
            "alchq_lease_until": utc_now(self.settings.lease),
            "time_updated": utc_now(),
            **extra,
        }

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
                # Due tasks only, on the database's clock; most urgent (lowest
                # priority number) first, then oldest first.
                ready=(c.status == Status.PENDING) & (c.run_at <= utc_now()),
                order_by=[c.priority, c.time_created, *table.primary_key.columns],
                values=self._claim_values(alchq_attempts=_bump(c.alchq_attempts)),
                token_column="alchq_attempts",  # noqa: S106 - not a password
                limit=1,
            )
            session.commit()
        except DBAPIError as exc:
            with contextlib.suppress(Exception):
                session.rollback()
            raise self._diagnose(exc, model, engine) from exc
        self._connected = True
        return claims[0] if claims else None

    def _diagnose(self, exc: DBAPIError, model: type[BaseQueue], engine: Engine) -> Exception:
        """Turn a failed claim into a clear error: unreachable, table missing, or as is."""
        if self._dialect(engine).is_transient(exc):
            try:
                with engine.connect() as conn:
                    conn.exec_driver_sql("SELECT 1")
            except DBAPIError as again:
                if self._connected or self._dialect(engine).server_is_busy(again):
                    return again
                return DatabaseUnreachableError(
                    f"cannot reach the database {safe_url(engine)}: {first_line(again)}"
                )
            return exc
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

    def _hand(self, session: Session, model: type[BaseQueue], claim: Claim) -> InHand:
        mapper = inspect(model)
        engine = self._engine(session, mapper)
        table = mapper.local_table
        assert isinstance(table, Table)
        return InHand(
            model=model,
            claim=claim,
            table=table,
            engine=engine,
            dialect=self._dialect(engine),
            label=_label(model, claim),
            time_limit=float(model.alchq_time_limit),
            thread_id=threading.get_ident(),
        )

    def _execute(self, session: Session, model: type[BaseQueue], claim: Claim) -> BaseQueue | None:
        hand = self._hand(session, model, claim)
        self._monitor.hold(hand)
        try:
            return self._execute_held(session, hand)
        finally:
            if self._deferred is None or self._deferred.hand is not hand:
                self._monitor.drop(hand)

    def _execute_held(self, session: Session, hand: InHand) -> BaseQueue | None:
        model, claim, label = hand.model, hand.claim, hand.label
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
        key = claim.pk[0] if len(claim.pk) == 1 else claim.pk
        try:
            task = session.get(model, key, populate_existing=True)
        except Exception as exc:  # a row whose columns cannot be loaded
            with contextlib.suppress(Exception):
                session.rollback()
            if hand.dialect.is_transient(exc):
                self._defer(hand, None)
                return None
            outcome = Outcome(Status.ERROR, exc, traceback.format_exc())
            self._finish(session, hand, outcome, None, detail=f"row could not be loaded: {exc}")
            return None
        if task is None:
            session.rollback()
            logger.warning("%s was deleted after it was claimed; skipped", label)
            return None
        hand.failures = int(task.alchq_failures or 0)
        if claim.token >= MAX_COUNTER:
            # Only a hand-edited row gets here; its token no longer fences anything.
            bad = TaskFailure(f"alchq_attempts reached its maximum ({MAX_COUNTER}); not run")
            self._finish(session, hand, Outcome(Status.ERROR, bad, None), task)
            return task
        _tracker.active, _tracker.writes = True, False
        _tracker.dbapi_connection = self._connection(
            session, inspect(model)
        ).connection.dbapi_connection
        try:
            try:
                hand.in_run = True
                task.run()
            finally:
                hand.in_run = False
            self._keep_status(task)
            session.flush()
        except WorkerShutdown:
            _tracker.active = False
            with contextlib.suppress(Exception):
                session.rollback()
            self._release(session, hand)
            raise
        except BaseException as exc:
            # Everything run() raises ends the task, Ctrl-C and sys.exit()
            # included: real signals reach the worker through its handlers.
            _tracker.active = False
            tb = traceback.format_exc()
            with contextlib.suppress(Exception):
                session.rollback()
            if hand.dialect.is_transient(exc):
                logger.warning(
                    "%s: the database went away during run() (%s); it will run again",
                    label,
                    first_line(exc),
                )
                self._defer(hand, None)
                return task
            self._finish(session, hand, self._failure(hand, exc, tb), task)
            return task
        _tracker.active = False
        self._finish(session, hand, Outcome(Status.PROCESSED), task, had_writes=_tracker.writes)
        return task

    @staticmethod
    def _failure(hand: InHand, exc: BaseException, tb: str | None) -> Outcome:
        """The outcome of a run that raised: a snooze, a retry (policy), or ERROR."""
        if isinstance(exc, Snooze):
            return Outcome(Status.PENDING, exc, None, again_in=exc.seconds)
        policy = hand.model.alchq_retry
        failures = hand.failures + 1
        if policy is not None and policy.retries(exc, failures):
            return Outcome(Status.PENDING, exc, tb, again_in=policy.wait(failures))
        return Outcome(Status.ERROR, exc, tb)

    @staticmethod
    def _keep_status(task: BaseQueue) -> None:
        """The worker owns ``status``: drop a change run() made to it."""
        history = inspect(task).attrs.status.history
        if history.has_changes():
            set_committed_value(task, "status", Status.PROCESSING)

    def _still_ours(self, hand: InHand) -> Any:
        c = hand.table.c
        return (
            (c.status == Status.PROCESSING)
            & (c.alchq_worker == self.id)
            & (c.alchq_attempts == hand.claim.token)
        )

    def _finish(
        self,
        session: Session,
        hand: InHand,
        outcome: Outcome,
        task: BaseQueue | None,
        *,
        had_writes: bool = False,
        detail: str | None = None,
    ) -> None:
        """Commit ``outcome`` (with what run() flushed) if the claim is still ours."""
        values = outcome.values(hand.table)
        try:
            conn = self._connection(session, inspect(hand.model))
            if not hand.dialect.finish(
                conn, hand.table, hand.claim, self._still_ours(hand), values
            ):
                session.rollback()
                logger.warning(
                    "%s: this worker no longer holds the claim; its outcome (%s) was discarded",
                    hand.label,
                    outcome.status.value,
                )
                return
            session.commit()
        except DBAPIError as exc:
            with contextlib.suppress(Exception):
                session.rollback()
            if not hand.dialect.is_transient(exc):
                raise
            logger.warning(
                "%s: could not record %s, the database is away (%s); will retry",
                hand.label,
                outcome.status.value,
                first_line(exc),
            )
            self._defer(hand, outcome, had_writes)
            return
        if task is not None:
            for key in ("status", "alchq_error_type", "alchq_error_message", "alchq_traceback"):
                if key in values:
                    set_committed_value(task, key, values[key])
            # Written by SQL expressions: read back on access.
            computed = ("alchq_finished_at", "time_updated", "alchq_lease_until", "alchq_worker")
            session.expire(task, [*computed, "run_at", "alchq_failures"])
        if outcome.exc is not None and detail is None:
            detail = f"{type(outcome.exc).__name__}: {outcome.exc}"
        if outcome.status is Status.PENDING:
            self._log_again(hand, outcome)
        else:
            self._log_end(hand, outcome.status, detail)
        if outcome.status is Status.ERROR and task is not None and outcome.exc is not None:
            self._call_error(session, task, outcome.exc, hand.label)

    def _release(self, session: Session, hand: InHand) -> bool:
        """Put the task in hand back to PENDING (shutdown), if the claim is still ours."""
        values = _released()
        try:
            conn = self._connection(session, inspect(hand.model))
            ok = hand.dialect.finish(conn, hand.table, hand.claim, self._still_ours(hand), values)
            session.commit()
        except DBAPIError as exc:
            with contextlib.suppress(Exception):
                session.rollback()
            logger.warning(
                "%s: could not release it (%s); its lease will", hand.label, first_line(exc)
            )
            return False
        if ok:
            logger.info("%s released: back to PENDING", hand.label)
        return ok

    def _call_error(
        self, session: Session, task: BaseQueue, exc: BaseException, label: str
    ) -> None:
        try:
            task.error(exc)
            session.commit()
        except Exception as err:
            with contextlib.suppress(Exception):
                session.rollback()
            logger.error("%s: error() raised %s: %s", label, type(err).__name__, err)
            logger.debug("error() traceback", exc_info=True)

    @staticmethod
    def _log_again(hand: InHand, outcome: Outcome) -> None:
        """A run that ended with the task PENDING again: snoozed, or failed and retried."""
        duration = time.monotonic() - hand.started
        extra = {"alchq_outcome": "RETRY", "alchq_duration": duration}
        if not outcome.failed:
            extra["alchq_outcome"] = "SNOOZED"
            logger.info(
                "%s snoozed after %.3fs: runs again in %gs",
                hand.label,
                duration,
                outcome.again_in,
                extra=extra,
            )
            return
        policy = hand.model.alchq_retry
        logger.warning(
            "%s failed in %.3fs (attempt %d of %d), retrying in %.1fs: %s: %s",
            hand.label,
            duration,
            hand.failures + 1,
            policy.attempts if policy is not None else 1,
            outcome.again_in,
            type(outcome.exc).__name__,
            outcome.exc,
            extra=extra,
        )

    @staticmethod
    def _log_end(hand: InHand, status: Status, detail: str | None = None) -> None:
        duration = time.monotonic() - hand.started
        extra = {"alchq_outcome": status.value, "alchq_duration": duration}
        if detail is None:
            logger.info("%s %s in %.3fs", hand.label, status.value, duration, extra=extra)
        else:
            # A failed task is worth a look, but it is not the worker's error.
            logger.warning(
                "%s %s in %.3fs: %s", hand.label, status.value, duration, detail, extra=extra
            )

    # -- the database was away: outcomes written later ---------------------------

    def _defer(self, hand: InHand, outcome: Outcome | None, had_writes: bool = False) -> None:
        self._deferred = _Deferred(hand, outcome, had_writes)

    def _settle_deferred(self) -> None:
        """Write the outcome the database was away for, waiting for it to come back."""
        failures = 0
        while self._deferred is not None:
            deferred = self._deferred
            try:
                self._settle(deferred)
            except DBAPIError as exc:
                if not deferred.hand.dialect.is_transient(exc):
                    raise
                if self._abort:
                    logger.warning(
                        "%s: giving up on the database; its lease will put it back",
                        deferred.hand.label,
                    )
                    self._deferred = None
                    self._monitor.drop(deferred.hand)
                    return
                failures += 1
                delay = min(self.settings.max_backoff, 0.25 * 2**failures)
                log = logger.warning if failures == 1 else logger.debug
                log("database unavailable, retrying in %.1fs: %s", delay, first_line(exc))
                time.sleep(delay)
                continue
            self._deferred = None
            self._monitor.drop(deferred.hand)
            if failures:
                logger.info("database is back")

    def _settle(self, deferred: _Deferred) -> None:
        hand, outcome = deferred.hand, deferred.outcome
        c = hand.table.c
        pk_match = [col == v for col, v in zip(hand.table.primary_key, hand.claim.pk, strict=True)]
        call_error = False
        with hand.engine.connect() as conn:
            row = conn.execute(
                select(c.status, c.alchq_worker, c.alchq_attempts).where(*pk_match)
            ).one_or_none()
            if row is None:
                logger.warning("%s was deleted while the database was away", hand.label)
                return
            ours = row.alchq_worker == self.id and row.alchq_attempts == hand.claim.token
            if not ours:
                logger.warning(
                    "%s was taken over while the database was away; this worker's outcome "
                    "was discarded",
                    hand.label,
                )
                return
            if row.status != Status.PROCESSING:
                # The commit we lost sight of did land.
                call_error = row.status == Status.ERROR
            elif outcome is None or (outcome.status is Status.PROCESSED and deferred.had_writes):
                # Its run's writes died with the connection: run it again.
                values = _released()
                hand.dialect.finish(conn, hand.table, hand.claim, self._still_ours(hand), values)
                conn.commit()
                logger.warning("%s: back to PENDING; it will run again", hand.label)
                return
            else:
                hand.dialect.finish(
                    conn, hand.table, hand.claim, self._still_ours(hand), outcome.values(hand.table)
                )
                conn.commit()
                call_error = outcome.status is Status.ERROR
        if outcome is not None:
            self._log_end(hand, outcome.status, "recorded once the database was back")
            if call_error and outcome.exc is not None:
                self._error_in_new_session(hand, outcome.exc)

    def _error_in_new_session(self, hand: InHand, exc: BaseException) -> None:
        session = self.source.open()
        try:
            key = hand.claim.pk[0] if len(hand.claim.pk) == 1 else hand.claim.pk
            task = session.get(hand.model, key)
            if task is not None:
                self._call_error(session, task, exc, hand.label)
        finally:
            with contextlib.suppress(Exception):
                self.source.release(session)

    def _finish_elsewhere(self, hand: InHand, outcome: Outcome | None, *, call_error: bool) -> None:
        """From the monitor thread: end the claim on a fresh connection, not waiting on locks."""
        values = outcome.values(hand.table) if outcome is not None else _released()
        try:
            with hand.engine.connect() as conn:
                # Briefly: the stuck task's own transaction may hold the row, and
                # the process must be gone within about 2 s of the last signal.
                with hand.dialect.short_lock_wait(conn, 0.3):
                    ok = hand.dialect.finish(
                        conn, hand.table, hand.claim, self._still_ours(hand), values
                    )
                    conn.commit()
        except Exception as exc:
            logger.warning(
                "%s: could not end its claim (%s); its lease will", hand.label, first_line(exc)
            )
            return
        if ok and outcome is not None:
            self._log_end(hand, outcome.status, f"{type(outcome.exc).__name__}: {outcome.exc}")
            # A retried outcome (PENDING again) calls no error(): only the last failure does.
            if call_error and outcome.status is Status.ERROR and outcome.exc is not None:
                self._error_in_new_session(hand, outcome.exc)
        elif ok:
            logger.info("%s released: back to PENDING", hand.label)

    # -- heartbeat and rescue -------------------------------------------------------

    def _heartbeat(self, hand: InHand) -> bool:
        """Monitor thread: renew the lease; False if the claim is no longer ours."""
        with hand.engine.connect() as conn:
            with hand.dialect.short_lock_wait(conn, 1.0):
                ok = hand.dialect.finish(
                    conn,
                    hand.table,
                    hand.claim,
                    self._still_ours(hand),
                    lease_values(self.settings.lease),
                )
                conn.commit()
        return ok

    def _maybe_rescue(self) -> None:
        if time.monotonic() < self._next_rescue:
            return
        self._next_rescue = time.monotonic() + self.settings.rescue_interval
        for model in self.models:
            self._rescue(model)

    def _maybe_prune(self) -> None:
        """Every prune_interval (off by default), delete old finished tasks, between tasks.

        Logs and swallows its own failures: housekeeping must not stop the worker.
        """
        interval = self.settings.prune_interval
        if interval is None or time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + interval
        prune_periodically(
            self.source, self.models, self.settings, lambda: self.stopping, self._transient
        )

    def _rescue(self, model: type[BaseQueue]) -> None:
        """Put tasks of lost workers back, or end them once they were lost too often."""
        session = self.source.open()
        try:
            mapper = inspect(model)
            table = mapper.local_table
            assert isinstance(table, Table)
            c = table.c
            engine = self._engine(session, mapper)
            dialect = self._dialect(engine)
            expired = (c.status == Status.PROCESSING) & (
                c.alchq_lease_until.is_(None) | (c.alchq_lease_until < utc_now())
            )
            max_lost = int(self.settings.max_lost_claims)
            try:
                back = dialect.claim(
                    self._connection(session, mapper),
                    table,
                    ready=expired & (c.alchq_lost_claims + 1 < max_lost),
                    order_by=[c.alchq_lease_until],
                    values={**_released(), "alchq_lost_claims": _bump(c.alchq_lost_claims)},
                    token_column="alchq_lost_claims",  # noqa: S106 - not a password
                    limit=100,
                )
                session.commit()
                lost = dialect.claim(
                    self._connection(session, mapper),
                    table,
                    ready=expired & (c.alchq_lost_claims + 1 >= max_lost),
                    order_by=[c.alchq_lease_until],
                    values=self._claim_values(
                        alchq_attempts=_bump(c.alchq_attempts),
                        alchq_lost_claims=_bump(c.alchq_lost_claims),
                    ),
                    token_column="alchq_attempts",  # noqa: S106 - not a password
                    limit=10,
                )
                session.commit()
            except DBAPIError as exc:
                with contextlib.suppress(Exception):
                    session.rollback()
                raise self._diagnose(exc, model, engine) from exc
            self._connected = True
            for claim in back:
                logger.warning(
                    "%s: its worker was lost (lease expired); back to PENDING "
                    "(lost claims: %d of %d)",
                    _label(model, claim),
                    claim.token,
                    max_lost,
                )
            for claim in lost:
                hand = self._hand(session, model, claim)
                self._monitor.hold(hand)
                try:
                    key = claim.pk[0] if len(claim.pk) == 1 else claim.pk
                    task = session.get(model, key, populate_existing=True)
                    gone = WorkerLostError(
                        f"{hand.label} lost its worker {max_lost} times (killed, frozen or "
                        "cut off mid-run); giving up"
                    )
                    self._finish(session, hand, Outcome(Status.ERROR, gone, None), task)
                finally:
                    if self._deferred is None or self._deferred.hand is not hand:
                        self._monitor.drop(hand)
        finally:
            with contextlib.suppress(Exception):
                self.source.release(session)

    # -- Flask -------------------------------------------------------------------------

    @staticmethod
    def _current_app() -> Any:
        try:
            from flask import current_app, has_app_context
        except ImportError:
            return None
        return current_app._get_current_object() if has_app_context() else None  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def _app_context(self) -> Iterator[None]:
        """In another thread, the Flask app context the worker was started in."""
        if self._app is None:
            yield
            return
        with self._app.app_context():
            yield


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
