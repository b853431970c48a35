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
import dataclasses
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from sqlalchemy import Column, Engine, false, inspect, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from alchq import _notify
from alchq._binds import Binds, Outage
from alchq._claimer import Claimer
from alchq._dialects import Claim, dialect_for
from alchq._executor import Executor
from alchq._held import Held, WorkerShutdown
from alchq._link import ADOPT_ENV, SUPERVISOR_PID_ENV
from alchq._monitor import Monitor
from alchq._prune import prune_periodically
from alchq._recorder import Recorder
from alchq._recovery import Rescuer
from alchq._registry import Registry
from alchq._reporter import Reporter
from alchq._scheduler import Scheduler
from alchq._sessions import SessionSource, flask_app, resolve
from alchq._stopping import EXIT_INTERRUPTED, REPLACED_ENV, Stopper
from alchq._wakeup import Waiter
from alchq.config import Settings
from alchq.exceptions import DatabaseError
from alchq.model import BaseQueue, check_task_model, queue_columns, task_table

__all__ = [
    "Worker",
    "WorkerShutdown",
    "process_all",
    "process_forever",
    "process_n",
    "process_one",
]

logger = logging.getLogger("alchq.worker")

#: A batch claims as many tasks as recent run times say finish within this
#: (seconds); a claimed task not started by then is handed back.
BATCH_SPAN = 0.1
#: The most tasks one claim takes, whatever a model's ``alchq_batch`` says:
#: below PostgreSQL's 64 cached subtransactions per transaction (one SAVEPOINT
#: per writing task), past which every snapshot in the database gets slower.
MAX_BATCH = 50


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

    Each round: write an outcome the database was away for, rescue lost claims
    and prune (when due), then for each model claim a task, run it and record
    its outcome; wait when nothing was ready.
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
        if settings is None:
            settings = Settings.load(
                {"poll_interval": poll_interval}, app_config=self.source.app_config
            )
        elif poll_interval is not None:  # the explicit argument wins, as everywhere
            settings = dataclasses.replace(settings, poll_interval=poll_interval)
        self.settings = settings
        # host:pid:random, the pid being the command's: a supervised worker
        # process's supervisor (the registry also records the process's own pid).
        pid = os.environ.get(SUPERVISOR_PID_ENV) or os.getpid()
        self.id = name or f"{socket.gethostname()}:{pid}:{secrets.token_hex(3)}"
        self._app = flask_app()
        self._next_prune = 0.0
        self._waiter = Waiter()
        self._binds = Binds(self.source)
        self._registry = Registry(self.id, self._binds, self.settings, self.models)
        self._monitor = Monitor(
            heartbeat=self._registry.heartbeat,
            heartbeat_interval=self.settings.heartbeat_interval,
            on_time_limit=lambda held: self._stopper.time_limit_reached(held),
            on_hard_deadline=lambda held: self._stopper.hard_deadline_reached(held),
            on_tick=self._watch_held,
        )
        self._recorder = Recorder(
            self._binds, self._monitor, self.settings, aborted=lambda: self._stopper.aborted
        )
        self._stopper = Stopper(
            self._monitor, self._recorder, self.settings, self.app_context, self._waiter.wake
        )
        self._claimer = Claimer(self.id, self._binds, self.settings)
        #: Each model's recent time per task (seconds, a moving average).
        self._run_time: dict[type[BaseQueue], float] = {}
        self._reporter = Reporter(self._binds)
        self._executor = Executor(
            self._binds, self.settings, self._recorder.commit_early, self._reporter
        )
        self._rescuer = Rescuer(
            self.id,
            self._binds,
            self._monitor,
            self._recorder,
            self.settings,
            adopt=_adopted(),
        )
        self._scheduler = Scheduler(
            self.models if scheduler else (), self._binds, self.settings, self.app_context
        )
        #: Called once with the worker when its checks passed: it reached the
        #: database, registered, and found every model's table (before its first
        #: claim). The commands log their "serving" line then.
        self.on_ready: Callable[[Worker], object] | None = None
        self._ready = False

    def _watch_held(self, held: Held) -> None:
        """Monitor thread, each tick while a task runs: its progress and cancel requests."""
        if self._reporter.tick(held):
            self._stopper.cancel_requested(held)

    # -- control -------------------------------------------------------------

    def stop(self, now: bool = False, *, within: float | None = None, why: str = "") -> None:
        """Ask the worker to stop (thread-safe; also from a signal handler).

        By default it claims nothing more and the task in hand finishes, however
        long it takes. ``within=seconds`` gives the task in hand that long, then
        stops it as ``now=True`` does at once: the task is interrupted and put
        back to PENDING (``why`` says why, in the log).
        """
        if now:
            self._stopper.stop_now(why or "stop requested")
        elif within is not None:
            self._stopper.stop_within(within)
        else:
            self._stopper.stop()

    @property
    def stopping(self) -> bool:
        return self._stopper.stopping

    @contextlib.contextmanager
    def app_context(self) -> Iterator[None]:
        """In another thread, the Flask app context the worker was created in (if any)."""
        if self._app is None:
            yield
            return
        with self._app.app_context():
            yield

    # -- public loops ----------------------------------------------------------

    def process_one(self) -> BaseQueue | None:
        """Claim and run at most one ready task; return it, or None. Never waits."""
        with self._running():
            self._recorder.settle_deferred()
            self._registry.register()
            self._check_ready()
            self._rescuer.maybe_rescue(self.models)
            for model in self.models:
                if not self._recorder.claimable(model):
                    continue
                ran, task = self._process(model, keep=True)
                if ran:
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
        outage = Outage(self.settings.max_backoff, self._binds)
        with self._running(), self._woken_by_new_tasks(wait):
            while True:
                self._recorder.settle_deferred()
                if self.stopping or (limit is not None and done >= limit):
                    break
                progressed = False
                try:
                    self._registry.register()  # once: a worker is known before it claims
                    self._check_ready()
                    self._rescuer.maybe_rescue(self.models)
                    self._maybe_prune()
                    for model in self.models:
                        if self.stopping or (limit is not None and done >= limit):
                            break
                        if not self._recorder.claimable(model):
                            continue
                        room = None if limit is None else limit - done
                        ran, _task = self._process(model, keep=False, room=room)
                        if ran:
                            done += ran
                            progressed = True
                    outage.over()
                except (DatabaseError, DBAPIError) as exc:
                    # Before the first round trip that worked, a problem is most
                    # likely the configuration (a wrong URL, a missing table, a
                    # read-only file): say so in one line and stop. A server that
                    # answers "starting up", and anything once running, is waited
                    # out, said once and then every minute.
                    if not self._binds.connected and (
                        isinstance(exc, DatabaseError) or not self._binds.is_transient(exc)
                    ):
                        raise
                    self._waiter.wait(outage.failed(exc))
                    continue
                if not progressed:
                    if not wait:
                        break
                    self._waiter.wait(self.settings.poll_interval)
        return done

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        """Signals, the monitor and the scheduler, for the duration of a public call."""
        self._monitor.start()
        try:
            self._scheduler.start()
            with self._stopper.signal_handlers():
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
            self._stopper.close()
            self._scheduler.close()
            self._monitor.close()
            self._registry.deregister()

    @contextlib.contextmanager
    def _woken_by_new_tasks(self, wait: bool) -> Iterator[None]:
        """While the loop may wait: new tasks in the served tables end the wait."""
        if not wait:
            yield
            return
        session = self.source.open()
        try:
            engines = [self._binds.engine(session, model) for model in self.models]
        finally:
            self.source.release(session)
        tables = [
            (_notify.table_key(task_table(model)), engine, dialect_for(engine))
            for model, engine in zip(self.models, engines, strict=True)
        ]
        with self._waiter.woken_by_new_tasks(tables):
            yield

    def _check_ready(self) -> None:
        """Once, when :attr:`on_ready` is set: query each model's table (no row), then call it.

        Fails as a claim would: a clear error for a missing table or a wrong URL.
        """
        if self._ready or self.on_ready is None:
            return
        session = self.source.open()
        try:
            for model in self.models:
                engine = self._binds.engine(session, model)
                try:
                    with self._binds.connect(engine) as conn:
                        conn.execute(select(*_claimed_columns(model)).where(false()))
                except DBAPIError as exc:
                    raise self._binds.diagnose(exc, model, engine) from exc
        finally:
            self.source.release(session)
        self._ready = True
        self.on_ready(self)

    def _maybe_prune(self) -> None:
        """Every prune_interval (off by default), delete old finished tasks, between tasks.

        Logs and swallows its own failures: housekeeping must not stop the worker.
        """
        interval = self.settings.prune_interval
        if interval is None or time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + interval
        prune_periodically(self._binds, self.models, self.settings, lambda: self.stopping)

    # -- one task: claim -> run -> record ---------------------------------------------

    def _process(
        self, model: type[BaseQueue], keep: bool, room: int | None = 1
    ) -> tuple[int, BaseQueue | None]:
        """Claim and run a batch of ``model``'s tasks (one when ``keep``): (how many ran,
        the last task).

        The batch is as large as the model's recent run times fit in
        :data:`BATCH_SPAN` (one until they are known), at most ``room`` and its
        ``alchq_batch``. Its PROCESSED outcomes share one commit; a claimed task
        not started within the span, or when the worker is told to stop, is
        handed back unrun at once, so prefetching never keeps tasks from other
        workers for long.
        """
        session = self.source.open()
        task: BaseQueue | None = None
        unrun: list[Claim] = []
        ran = 0
        try:
            limit = 1 if keep else self._batch_size(model, room)
            loaded: dict[Any, BaseQueue] = {}
            if limit > 1:
                claims, loaded = self._claimer.claim_loaded(session, model, limit)
            else:
                claims = self._claimer.claim(session, model, limit=limit)
            unrun = list(claims)
            batched = len(claims) > 1
            began = time.monotonic()
            if batched and not loaded:
                loaded = self._executor.preload(
                    session, model, [self._held(session, model, c) for c in claims]
                )
            while unrun and not self.stopping:
                if ran and (time.monotonic() - began > BATCH_SPAN or model in self._recorder.solo):
                    break
                claim = unrun.pop(0)
                started = time.monotonic()
                task = self._execute(
                    session, model, claim, batched=batched, loaded=loaded.pop(claim.pk[0], None)
                )
                ran += 1
                self._learn(model, time.monotonic() - started)
            return ran, task
        except BaseException:
            self._recorder.commit_batch()
            with contextlib.suppress(Exception):
                session.rollback()
            raise
        finally:
            self._recorder.commit_batch()
            self._monitor.tell()
            # Claimed but not started (a stop, the span): back at once, uncounted.
            self._recorder.hand_back(session, [self._held(session, model, c) for c in unrun])
            if not keep:
                with contextlib.suppress(Exception):
                    self.source.release(session)
            elif self.source.scoped is None:
                _detach(session, task)

    def _batch_size(self, model: type[BaseQueue], room: int | None) -> int:
        """How many of ``model``'s tasks to claim at once (see :meth:`_process`)."""
        most = min(int(model.alchq_batch), MAX_BATCH)
        per_task = self._run_time.get(model)
        if most <= 1 or per_task is None or model in self._recorder.solo:
            return 1
        size = max(1, min(most, int(BATCH_SPAN / max(per_task, 1e-6))))
        if room is not None:
            size = max(1, min(size, room))
        # A few sizes only: each has its claim statement, built once.
        return size if size == most or size == room else 1 << (size.bit_length() - 1)

    def _learn(self, model: type[BaseQueue], seconds: float) -> None:
        """Keep a moving average of ``model``'s time per task (run and record)."""
        before = self._run_time.get(model)
        self._run_time[model] = seconds if before is None else 0.8 * before + 0.2 * seconds

    def _held(self, session: Session, model: type[BaseQueue], claim: Claim) -> Held:
        engine = self._binds.engine(session, model)
        return Held(
            model=model,
            claim=claim,
            worker_id=self.id,
            table=task_table(model),
            engine=engine,
            dialect=self._binds.dialect(engine),
            time_limit=float(model.alchq_time_limit),
        )

    def _execute(
        self,
        session: Session,
        model: type[BaseQueue],
        claim: Claim,
        *,
        batched: bool = False,
        loaded: BaseQueue | None = None,
    ) -> BaseQueue | None:
        held = self._held(session, model, claim)
        self._monitor.hold(held)
        self._registry.in_hand = 1
        try:
            ran = self._executor.run(session, held, batched=batched, loaded=loaded)
            self._recorder.record(ran, held)
        finally:
            if not self._recorder.holds(held):
                self._monitor.drop(held, tell_later=batched)
                self._registry.in_hand = 0
        if isinstance(ran.outcome.exc, WorkerShutdown):
            raise ran.outcome.exc
        return ran.task


def _detach(session: Session, task: BaseQueue | None) -> None:
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


def _adopted() -> list[str]:
    """Workers whose claims this one takes over at once: the one this process replaced
    (exec), or those of the worker process its supervisor started it in place of."""
    ids = [os.environ.pop(REPLACED_ENV, "")] + os.environ.pop(ADOPT_ENV, "").split(",")
    return [i for i in ids if i]


def _models(model: type[BaseQueue] | Sequence[type[BaseQueue]]) -> tuple[type[BaseQueue], ...]:
    # Only a list or tuple means several models; anything else is checked as
    # one model, so a task instance or a string gets a clear TaskDefinitionError.
    if isinstance(model, (list, tuple)):
        return tuple(model)
    return (model,)  # type: ignore[return-value]  # checked by Worker


def _claimed_columns(model: type[BaseQueue]) -> list[Column[Any]]:
    """The columns a claim reads and writes: the key and BaseQueue's own.

    Not the model's other columns: a worker whose model no longer matches its
    table there (a migration renamed one) still serves, releasing the rows it
    cannot load for a worker whose code matches.
    """
    table = task_table(model)
    names = [str(c.name) for c in queue_columns()]
    return [*table.primary_key.columns, *(table.c[n] for n in names if n in table.c)]


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
