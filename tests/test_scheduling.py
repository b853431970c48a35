"""Scheduling: run_at, priority, retry policies, Snooze, unique tasks and cancel().

Every test runs on SQLite and PostgreSQL (the ``db_url`` fixture); the ones
about what a worker does over time use real ``alchq run`` processes. Times are
compared on the database's clock: each run writes the database's time, the
row's run_at and its alchq_started_at into ``sch_attempt_log`` (committed at
once), so "not early" is checked on every run, not guessed from wall time.
Models are in tests/models_scheduling.py, importable by the worker processes.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import pytest
from sqlalchemy import Engine, Row, delete, func, inspect, select, type_coerce, update
from sqlalchemy.orm import Session

import alchq
from alchq import BaseQueue, CancelError, Enqueued, Retry, Status, UTCDateTime, metadata, worker
from alchq._dialects import utc_now
from tests.conftest import ROOT, worker_env
from tests.models_scheduling import (
    SchHard,
    SchOrdered,
    SchRetry,
    SchRetryValue,
    SchSeedRetry,
    SchSnooze,
    SchTask,
    attempt_log,
    error_log,
    run_log,
)
from tests.support import wait_until
from tests.test_worker import WorkerProcess

T = TypeVar("T", bound=BaseQueue)

#: The unique-key race: one interpreter, forked into N racing processes.
RACE = "from tests.models_scheduling import race_enqueue; race_enqueue()"

#: The database's current time, as an aware UTC datetime.
DB_NOW = type_coerce(utc_now(), UTCDateTime())
SCH_TASK: Any = SchTask.__table__  # type: ignore[attr-defined]

#: SQLite's clock has millisecond resolution: allow for one truncated millisecond.
MS = 0.002


# -- helpers -------------------------------------------------------------------


@pytest.fixture
def tables(engine: Engine) -> Engine:
    """The engine, with the tables of tests/models_scheduling.py (only those: each
    CREATE costs time)."""
    models = (SchTask, SchOrdered, SchRetry, SchRetryValue, SchSeedRetry, SchSnooze, SchHard)
    task_tables: list[Any] = [inspect(m).local_table for m in models]
    metadata.create_all(engine, tables=[*task_tables, attempt_log, error_log, run_log])
    return engine


@pytest.fixture
def spawn_worker() -> Iterator[Callable[..., WorkerProcess]]:
    """Start ``alchq run MODEL --database-url URL --poll-interval 0.1 ...``; killed at the end."""
    started: list[WorkerProcess] = []

    def spawn(model: str, db_url: str, *args: str) -> WorkerProcess:
        wp = WorkerProcess(
            f"tests.models_scheduling:{model}",
            "--database-url",
            db_url,
            "--poll-interval",
            "0.1",
            *args,
        )
        started.append(wp)
        return wp

    yield spawn
    for wp in started:
        wp.close()


def stop(wp: WorkerProcess) -> None:
    """SIGINT the worker and check that it exits cleanly."""
    wp.proc.send_signal(signal.SIGINT)
    assert wp.wait(timeout=15) == 0, wp.output
    assert "Traceback" not in wp.output, wp.output


def add(engine: Engine, *tasks: BaseQueue) -> list[int]:
    """Commit ``tasks`` and return their ids, in order."""
    with Session(engine, expire_on_commit=False) as s:
        s.add_all(tasks)
        s.commit()
        return [t.id for t in tasks]  # type: ignore[attr-defined]


def row(engine: Engine, model: type[T], pk: Any) -> T:
    with Session(engine) as s:
        task = s.get(model, pk)
        assert task is not None, f"{model.__name__} {pk} does not exist"
        return task


def status_of(engine: Engine, model: type[BaseQueue], pk: Any) -> Status | None:
    with Session(engine) as s:
        task = s.get(model, pk)
        return None if task is None else task.status


def db_now(engine: Engine) -> datetime:
    """The database's current time (aware UTC)."""
    with engine.connect() as conn:
        now = conn.scalar(select(DB_NOW))
    assert isinstance(now, datetime) and now.tzinfo is not None
    return now


def wait_for_db_time(engine: Engine, when: datetime, timeout: float = 30) -> None:
    """Sleep until the database's clock has reached ``when``."""
    deadline = time.monotonic() + timeout
    while db_now(engine) < when:
        assert time.monotonic() < deadline, f"the database clock never reached {when}"
        time.sleep(0.05)


def seconds(later: datetime | None, earlier: datetime | None) -> float:
    assert later is not None and earlier is not None
    return (later - earlier).total_seconds()


def attempts_of(engine: Engine, model: type[BaseQueue], task_id: int) -> list[Row[Any]]:
    """The task's sch_attempt_log rows (one per run, whatever its outcome), in order."""
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(attempt_log)
                .where(attempt_log.c.model == model.__name__, attempt_log.c.task_id == task_id)
                .order_by(attempt_log.c.id)
            ).all()
        )


def runs_of(engine: Engine, model: type[BaseQueue], task_id: int | None = None) -> list[int]:
    """Task ids in sch_run_log (committed with PROCESSED), in the order they ran."""
    query = select(run_log.c.task_id).where(run_log.c.model == model.__name__)
    if task_id is not None:
        query = query.where(run_log.c.task_id == task_id)
    with engine.connect() as conn:
        return list(conn.scalars(query.order_by(run_log.c.id)))


def errors_of(engine: Engine, model: type[BaseQueue], task_id: int) -> list[tuple[str, str]]:
    """(exception type, message) of each error() call of the task."""
    with engine.connect() as conn:
        return [
            (r.exc_type, r.message)
            for r in conn.execute(
                select(error_log.c.exc_type, error_log.c.message)
                .where(error_log.c.model == model.__name__, error_log.c.task_id == task_id)
                .order_by(error_log.c.id)
            )
        ]


def assert_never_early(attempts: Sequence[Row[Any]]) -> None:
    for a in attempts:
        assert a.started_at >= a.run_at, f"attempt {a.attempt} claimed before its run_at"


# -- run_at ---------------------------------------------------------------------


def test_delayed_task_waits_for_its_run_at_then_runs_promptly(
    tables: Engine, db_url: str, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    wp = spawn_worker("SchTask", db_url)
    [warm] = add(tables, SchTask(label="warm-up"))
    wait_until(lambda: status_of(tables, SchTask, warm) == Status.PROCESSED, 30, "the worker")

    an_hour_ago = datetime.now(timezone.utc) - timedelta(hours=1)
    [delayed, past] = add(
        tables,
        SchTask(label="delayed", run_at=timedelta(seconds=3)),
        SchTask(label="past", run_at=an_hour_ago),
    )
    now = db_now(tables)
    created = row(tables, SchTask, delayed)
    # Relative to the database's clock, evaluated by the INSERT itself.
    assert abs(seconds(created.run_at, created.time_created) - 3.0) < MS
    assert 1.0 < seconds(created.run_at, now) <= 3.0 + MS

    # An absolute run_at in the past runs at once.
    wait_until(lambda: status_of(tables, SchTask, past) == Status.PROCESSED, 10, "the past task")
    done_past = row(tables, SchTask, past)
    assert done_past.run_at == an_hour_ago
    assert seconds(done_past.alchq_started_at, done_past.time_created) < 3.0

    # About a second before it is due (database clock), it has not been touched.
    wait_for_db_time(tables, created.time_created + timedelta(seconds=2))
    c = SCH_TASK.c
    with tables.connect() as conn:
        early = conn.execute(
            select(c.status, c.alchq_attempts, c.alchq_started_at, DB_NOW.label("now")).where(
                c.id == delayed
            )
        ).one()
    assert early.now < created.run_at, "the test itself was too slow to look before run_at"
    assert (early.status, early.alchq_attempts, early.alchq_started_at) == ("PENDING", 0, None)
    assert runs_of(tables, SchTask, delayed) == []

    wait_until(lambda: status_of(tables, SchTask, delayed) == Status.PROCESSED, 15, "the task")
    done = row(tables, SchTask, delayed)
    assert done.alchq_attempts == 1
    assert done.alchq_started_at is not None
    assert done.alchq_started_at >= done.run_at
    assert seconds(done.alchq_started_at, done.run_at) < 2.0, "claimed late"
    assert runs_of(tables, SchTask, delayed) == [delayed]
    [attempt] = attempts_of(tables, SchTask, delayed)
    assert_never_early([attempt])
    assert wp.proc.poll() is None, wp.output
    stop(wp)


def test_absolute_run_at_in_any_time_zone_and_naive_as_utc(tables: Engine) -> None:
    now = datetime.now(timezone.utc)
    east, west = timezone(timedelta(hours=5)), timezone(timedelta(hours=-5))
    given = {
        "past, UTC+5": (now - timedelta(minutes=1)).astimezone(east),
        "past, naive UTC": (now - timedelta(minutes=1)).replace(tzinfo=None),
        "past, timedelta": timedelta(seconds=-30),
        "future, UTC-5": (now + timedelta(hours=1)).astimezone(west),
        "future, naive UTC": (now + timedelta(hours=1)).replace(tzinfo=None),
        "future, timedelta": timedelta(hours=1),
    }
    ids = dict(
        zip(
            given, add(tables, *(SchTask(label=k, run_at=v) for k, v in given.items())), strict=True
        )
    )
    for label, value in given.items():
        stored = row(tables, SchTask, ids[label]).run_at
        assert stored.tzinfo is not None and stored.utcoffset() == timedelta(0), label
        if isinstance(value, datetime):
            aware = value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
            assert stored == aware, label

    # By default a task is due when it is inserted, with the ORM or plain SQL.
    [orm] = add(tables, SchTask(label="default"))
    with tables.begin() as conn:
        conn.execute(SCH_TASK.insert().values(id=orm + 1, label="plain SQL"))
    for label, pk in (("default", orm), ("plain SQL", orm + 1)):
        ids[label] = pk
        default = row(tables, SchTask, pk)
        assert default.run_at == default.time_created, label

    assert worker.process_all(SchTask, engine=tables) == 5
    ran = {label for label, pk in ids.items() if status_of(tables, SchTask, pk) == Status.PROCESSED}
    assert ran == {"past, UTC+5", "past, naive UTC", "past, timedelta", "default", "plain SQL"}


class _AppClockAnHourAhead(datetime):
    @classmethod
    def now(cls, tz: Any = None) -> Any:
        return datetime.now(tz) + timedelta(hours=1)

    @classmethod
    def utcnow(cls) -> Any:
        return datetime.now(timezone.utc).replace(tzinfo=None) + timedelta(hours=1)


def test_relative_run_at_uses_the_database_clock_not_the_apps(
    tables: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Were run_at computed by the app (datetime.now() + delay), this skewed app
    # clock would put it an hour late; were "due" decided by the app, the task
    # would look an hour overdue.
    import alchq.model

    monkeypatch.setattr(alchq.model, "datetime", _AppClockAnHourAhead)
    [tid] = add(tables, SchTask(run_at=timedelta(seconds=3)))
    now = db_now(tables)
    task = row(tables, SchTask, tid)
    assert abs(seconds(task.run_at, task.time_created) - 3.0) < MS
    assert 1.0 < seconds(task.run_at, now) <= 3.0 + MS
    assert worker.process_all(SchTask, engine=tables) == 0
    assert status_of(tables, SchTask, tid) == Status.PENDING


# -- priority ---------------------------------------------------------------------


@pytest.mark.parametrize("runner", ["in-process", "worker-process"])
def test_tasks_run_by_priority_then_oldest_first(
    tables: Engine, db_url: str, runner: str, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    rng = random.Random(20261129)
    priorities = [rng.choice([-5, 0, 0, 3, 10]) for _ in range(100)]
    ids: list[int] = []
    with Session(tables) as s:
        for n, priority in enumerate(priorities):  # random priorities, in this known order
            task = SchOrdered(label=f"{priority}/{n}", priority=priority)
            s.add(task)
            s.flush()  # one INSERT each: time_created and id grow in this order
            ids.append(task.id)
        s.commit()
    expected = [ids[n] for n in sorted(range(100), key=lambda n: (priorities[n], n))]
    assert expected != ids  # the order of creation alone would not pass

    if runner == "in-process":
        assert worker.process_all(SchOrdered, engine=tables) == 100
    else:
        wp = spawn_worker("SchOrdered", db_url, "--burst")
        assert wp.wait(timeout=90) == 0, wp.output
    assert runs_of(tables, SchOrdered) == expected


def test_priority_ties_go_to_the_oldest_then_the_lowest_id(tables: Engine) -> None:
    # Ids run against creation order, so each level of (priority, time_created,
    # id) decides somewhere; time_created is set explicitly, on the database clock.
    spec = [  # id, priority, created seconds ago
        (5, 0, 9.0),
        (4, 0, 8.0),
        (3, 0, 8.0),
        (2, -1, 7.0),
        (1, 1, 10.0),
    ]
    now = db_now(tables)
    with Session(tables) as s:
        for pk, priority, ago in spec:
            s.add(SchOrdered(id=pk, priority=priority, time_created=now - timedelta(seconds=ago)))
        s.commit()
    assert worker.process_all(SchOrdered, engine=tables) == 5
    assert runs_of(tables, SchOrdered) == [2, 5, 3, 4, 1]


# -- retry policies ---------------------------------------------------------------


def test_retry_policy_runs_three_times_with_growing_waits_then_errors_once(
    tables: Engine, db_url: str, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    wp = spawn_worker("SchRetry", db_url)
    [tid] = add(tables, SchRetry(fail_runs=99))
    wait_until(lambda: errors_of(tables, SchRetry, tid), 30, "error() to be called")
    stop(wp)  # nothing more can happen to the task now

    task = row(tables, SchRetry, tid)
    assert task.status == Status.ERROR
    assert task.alchq_failures == 3
    assert task.alchq_attempts == 3
    assert task.alchq_error_type == "ValueError"
    assert task.alchq_error_message == f"run 3 of {tid} fails"
    assert task.note is None  # every run's changes rolled back
    assert errors_of(tables, SchRetry, tid) == [("ValueError", f"run 3 of {tid} fails")]
    assert runs_of(tables, SchRetry, tid) == []

    attempts = attempts_of(tables, SchRetry, tid)
    assert [a.attempt for a in attempts] == [1, 2, 3]
    assert_never_early(attempts)
    first, second, third = attempts
    # Waits of 0.3 s and 0.6 s, each ±10%: the run after a failure is not
    # claimed before its wait is over...
    assert seconds(second.at, first.at) >= 0.27 - MS
    assert seconds(third.at, second.at) >= 0.54 - MS
    # ...and the waits set (run_at of the next run - the failed run) grow.
    wait1 = seconds(second.run_at, first.at)
    wait2 = seconds(third.run_at, second.at)
    assert 0.27 - MS <= wait1 < 0.33 + 1.0
    assert 0.54 - MS <= wait2 < 0.66 + 1.0
    assert wait2 > wait1
    # Claimed promptly once due (the worker polls every 0.1 s).
    assert seconds(second.started_at, second.run_at) < 2.0
    assert seconds(third.started_at, third.run_at) < 2.0


def test_a_failed_run_with_attempts_left_goes_back_to_pending(tables: Engine) -> None:
    [tid] = add(tables, SchRetry(fail_runs=1, unique_key="retry-me"))
    assert isinstance(worker.process_one(SchRetry, engine=tables), SchRetry)

    waiting = row(tables, SchRetry, tid)
    assert waiting.status == Status.PENDING
    assert waiting.alchq_attempts == 1
    assert waiting.alchq_failures == 1
    assert waiting.alchq_error_type == "ValueError"
    assert waiting.alchq_error_message == f"run 1 of {tid} fails"
    assert waiting.alchq_traceback and "ValueError" in waiting.alchq_traceback
    assert waiting.alchq_worker is None
    assert waiting.alchq_lease_until is None
    assert waiting.note is None  # rolled back
    # run_at and time_updated come from the same statement: the wait exactly.
    assert 0.27 - MS <= seconds(waiting.run_at, waiting.time_updated) <= 0.33 + MS
    assert errors_of(tables, SchRetry, tid) == []  # error() waits for the last failure
    # Still PENDING, so it still holds its unique key.
    with Session(tables) as s:
        again = SchRetry.enqueue(s, unique_key="retry-me")
        assert (again.task.id, again.created) == (tid, False)
        s.commit()

    assert worker.process_n(SchRetry, 1, engine=tables, poll_interval=0.05) == 1
    done = row(tables, SchRetry, tid)
    assert done.status == Status.PROCESSED
    assert done.alchq_attempts == 2
    assert done.alchq_failures == 1
    assert (done.alchq_error_type, done.alchq_error_message, done.alchq_traceback) == (
        None,
        None,
        None,
    )
    assert done.note == "run 2"
    assert runs_of(tables, SchRetry, tid) == [tid]
    assert errors_of(tables, SchRetry, tid) == []
    attempts = attempts_of(tables, SchRetry, tid)
    assert len(attempts) == 2
    assert_never_early(attempts)
    assert seconds(attempts[1].at, attempts[0].at) >= 0.27 - MS


def test_exceptions_outside_retry_on_fail_at_once(tables: Engine) -> None:
    [typed, valued] = add(
        tables, SchRetryValue(fail_runs=9, exc="TypeError"), SchRetryValue(fail_runs=9)
    )
    # on=(Exception,), the default, leaves out SystemExit and KeyboardInterrupt.
    [exited] = add(tables, SchRetry(fail_runs=9, exc="SystemExit"))
    assert worker.process_all(SchRetryValue, engine=tables) == 2
    assert worker.process_all(SchRetry, engine=tables) == 1
    gone = row(tables, SchRetry, exited)
    assert (gone.status, gone.alchq_attempts, gone.alchq_failures) == (Status.ERROR, 1, 1)
    assert gone.alchq_error_type == "SystemExit"
    assert errors_of(tables, SchRetry, exited) == [("SystemExit", f"run 1 of {exited} fails")]

    failed = row(tables, SchRetryValue, typed)
    assert failed.status == Status.ERROR
    assert (failed.alchq_attempts, failed.alchq_failures) == (1, 1)
    assert failed.alchq_error_type == "TypeError"
    assert failed.alchq_finished_at is not None
    assert errors_of(tables, SchRetryValue, typed) == [("TypeError", f"run 1 of {typed} fails")]

    retried = row(tables, SchRetryValue, valued)
    assert retried.status == Status.PENDING
    assert (retried.alchq_attempts, retried.alchq_failures) == (1, 1)
    assert retried.alchq_error_type == "ValueError"
    assert errors_of(tables, SchRetryValue, valued) == []


def test_without_a_policy_the_seed_behaviour_holds(tables: Engine) -> None:
    assert SchSeedRetry.alchq_retry is None
    [once, always] = add(
        tables, SchSeedRetry(fail=1, unique_key="once"), SchSeedRetry(fail=9, unique_key="always")
    )
    # once: fails, error() adds a retry row that succeeds. always: fails, and
    # so do the two retries error() adds.
    assert worker.process_all(SchSeedRetry, engine=tables) == 5
    with Session(tables) as s:
        everything = list(s.scalars(select(SchSeedRetry).order_by(SchSeedRetry.id)))
    by_fail: dict[int, list[tuple[int, str, int, int]]] = {1: [], 9: []}
    for t in everything:
        by_fail[t.fail].append((t.retries, t.status.value, t.alchq_attempts, t.alchq_failures))
        assert t.unique_key == ("once" if t.fail == 1 else "always")
    assert by_fail[1] == [(0, "ERROR", 1, 1), (1, "PROCESSED", 1, 0)]
    assert by_fail[9] == [(0, "ERROR", 1, 1), (1, "ERROR", 1, 1), (2, "ERROR", 1, 1)]
    for t in everything:
        expected = [("ValueError", f"generation {t.retries} fails")]
        assert errors_of(tables, SchSeedRetry, t.id) == (
            expected if t.status == Status.ERROR else []
        )
        assert len(attempts_of(tables, SchSeedRetry, t.id)) == 1
    assert {t.id for t in everything if t.status == Status.ERROR}.isdisjoint(
        runs_of(tables, SchSeedRetry)
    )
    assert [everything[0].id, everything[1].id] == [once, always]


def test_retry_policy_is_validated() -> None:
    for bad in (
        {"attempts": 0},
        {"attempts": 1.5},
        {"delay": -1},
        {"backoff": 0.5},
        {"jitter": 1.0},
        {"on": (int,)},
        {"on": ()},
    ):
        with pytest.raises(alchq.ConfigurationError):
            Retry(**bad)
    with pytest.raises(alchq.ConfigurationError):
        alchq.Snooze(-1)
    policy = Retry(attempts=4, delay=1.0, backoff=3.0, max_delay=5.0, jitter=0)
    assert [policy.wait(n) for n in (1, 2, 3)] == [1.0, 3.0, 5.0]
    assert policy.retries(ValueError(), 3) and not policy.retries(ValueError(), 4)
    assert not policy.retries(KeyboardInterrupt(), 1)


@pytest.mark.slow
def test_a_retried_timeout_of_a_replaced_worker_calls_no_error(
    tables: Engine, db_url: str, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    # The time limit's last resort (the task cannot be interrupted, so its
    # worker process replaces itself) must follow the retry policy too.
    wp = spawn_worker("SchHard", db_url)
    [tid] = add(tables, SchHard())
    wait_until(lambda: status_of(tables, SchHard, tid) == Status.PROCESSED, 60, "the retry")
    done = row(tables, SchHard, tid)
    assert (done.alchq_attempts, done.alchq_failures) == (2, 1)
    assert errors_of(tables, SchHard, tid) == []
    assert [a.attempt for a in attempts_of(tables, SchHard, tid)] == [1, 2]
    assert "replacing the worker process" in wp.output


# -- snooze --------------------------------------------------------------------------


def test_snooze_runs_again_later_without_counting_a_failure(tables: Engine) -> None:
    [tid] = add(tables, SchSnooze())
    assert isinstance(worker.process_one(SchSnooze, engine=tables), SchSnooze)

    snoozed = row(tables, SchSnooze, tid)
    assert snoozed.status == Status.PENDING
    assert (snoozed.alchq_attempts, snoozed.alchq_failures) == (1, 0)
    assert snoozed.alchq_error_type is None and snoozed.alchq_traceback is None
    assert snoozed.note is None  # run()'s change rolled back
    assert runs_of(tables, SchSnooze, tid) == []  # and its flushed insert too
    assert abs(seconds(snoozed.run_at, snoozed.time_updated) - 1.0) < MS
    assert worker.process_one(SchSnooze, engine=tables) is None  # not due yet

    assert worker.process_n(SchSnooze, 1, engine=tables, poll_interval=0.05) == 1
    done = row(tables, SchSnooze, tid)
    assert done.status == Status.PROCESSED  # not ERROR: its policy allows one failure only
    assert (done.alchq_attempts, done.alchq_failures) == (2, 0)
    assert done.note == "run 2"
    assert runs_of(tables, SchSnooze, tid) == [tid]
    assert errors_of(tables, SchSnooze, tid) == []
    first, second = attempts_of(tables, SchSnooze, tid)
    assert_never_early([first, second])
    assert seconds(second.started_at, first.at) >= 1.0 - MS
    assert seconds(second.at, first.at) >= 1.0 - MS


# -- unique tasks -----------------------------------------------------------------------


def test_twenty_processes_enqueue_one_unique_task(tables: Engine, db_url: str) -> None:
    processes = 20
    race = subprocess.run(
        [sys.executable, "-c", RACE, db_url, "the-key", str(processes)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=worker_env(),
        check=False,
    )
    assert race.returncode == 0, race.stdout + race.stderr
    results = [json.loads(line) for line in race.stdout.splitlines()]
    assert len({r["pid"] for r in results}) == processes, race.stdout + race.stderr

    with Session(tables) as s:
        stored = list(s.scalars(select(SchTask).where(SchTask.unique_key == "the-key")))
        assert s.scalar(select(func.count()).select_from(SchTask)) == 1
    assert len(stored) == 1
    assert stored[0].status == Status.PENDING
    assert [r["created"] for r in results].count(True) == 1
    assert {r["id"] for r in results} == {stored[0].id}
    creator = next(r for r in results if r["created"])
    assert stored[0].label == f"pid {creator['pid']}"


def test_enqueue_semantics(tables: Engine) -> None:
    with Session(tables) as s:
        first = SchTask.enqueue(s, unique_key="k", label="first")
        assert isinstance(first, Enqueued) and isinstance(first.task, SchTask)
        assert first.created is True
        assert first.task.id is not None  # flushed
        # The same session sees its own, not yet committed, task.
        again = SchTask.enqueue(s, unique_key="k", label="again")
        assert again.created is False and again.task is first.task
        other = SchTask.enqueue(s, unique_key="other", label="other")
        assert other.created is True and other.task.id != first.task.id
        free = [SchTask.enqueue(s, unique_key=None, label="free") for _ in range(2)]
        assert all(e.created for e in free) and free[0].task.id != free[1].task.id
        plain = [SchTask.enqueue(s, label="plain") for _ in range(2)]
        assert all(e.created for e in plain)
        s.commit()
        k_id = first.task.id

    with Session(tables) as s:  # another session, after the commit
        held = SchTask.enqueue(s, unique_key="k", label="later")
        assert (held.created, held.task.id, held.task.label) == (False, k_id, "first")
        s.commit()
    with Session(tables) as s:
        assert s.scalar(select(func.count()).select_from(SchTask)) == 6
        assert s.scalar(select(func.count()).where(SchTask.unique_key.is_(None))) == 4

    # Nothing is committed for the caller: a rollback undoes the enqueue.
    with Session(tables) as s:
        assert SchTask.enqueue(s, unique_key="rolled-back").created
        assert SchTask.enqueue(s, label="rolled-back").created
        s.rollback()
    with Session(tables) as s:
        assert s.scalar(select(func.count()).select_from(SchTask)) == 6

    # The values given are the row's: timedelta run_at, priority.
    with Session(tables) as s:
        later, created = SchTask.enqueue(
            s, unique_key="later", priority=-3, run_at=timedelta(seconds=60)
        )
        assert created
        s.commit()
        assert later.priority == -3
        assert abs(seconds(later.run_at, later.time_created) - 60.0) < MS
        assert later.status == Status.PENDING


@pytest.mark.parametrize("end", ["PROCESSED", "ERROR", "CANCELLED"])
def test_a_finished_task_frees_its_unique_key(tables: Engine, end: str) -> None:
    with Session(tables) as s:
        first, created = SchTask.enqueue(s, unique_key="k", fail="boom" if end == "ERROR" else None)
        assert created
        s.commit()
        first_id = first.id
    if end == "CANCELLED":
        with Session(tables) as s:
            task = s.get(SchTask, first_id)
            assert task is not None
            task.cancel()
            s.commit()
    else:
        assert worker.process_all(SchTask, engine=tables) == 1
    assert status_of(tables, SchTask, first_id) == Status(end)

    with Session(tables) as s:
        second, created = SchTask.enqueue(s, unique_key="k")
        assert created and second.id != first_id
        s.commit()
        second_id = second.id
    with Session(tables) as s:  # and the new holder holds it
        third, created = SchTask.enqueue(s, unique_key="k")
        assert (created, third.id) == (False, second_id)


# -- cancel -------------------------------------------------------------------------------


def test_cancelled_task_never_runs(tables: Engine) -> None:
    [tid, other] = add(tables, SchTask(label="cancel me"), SchTask(label="keep me"))
    with Session(tables) as s:
        task = s.get(SchTask, tid)
        assert task is not None
        task.cancel()  # the task's own session
        assert task.status == Status.CANCELLED
        task.cancel()  # twice is fine
        s.commit()
        assert task.alchq_finished_at is not None
    assert status_of(tables, SchTask, tid) == Status.CANCELLED
    with Session(tables) as s:  # and again, from another session: nothing happens
        task = s.get(SchTask, tid)
        assert task is not None
        finished_at = task.alchq_finished_at
        task.cancel()
        s.commit()
    assert row(tables, SchTask, tid).alchq_finished_at == finished_at

    assert worker.process_all(SchTask, engine=tables) == 1
    assert worker.process_all(SchTask, engine=tables) == 0
    assert status_of(tables, SchTask, tid) == Status.CANCELLED
    assert status_of(tables, SchTask, other) == Status.PROCESSED
    assert runs_of(tables, SchTask) == [other]
    assert attempts_of(tables, SchTask, tid) == []


def test_cancel_takes_effect_when_committed(tables: Engine) -> None:
    [tid] = add(tables, SchTask())
    with Session(tables) as s:
        task = s.get(SchTask, tid)
        assert task is not None
        task.cancel()
        s.rollback()
    assert status_of(tables, SchTask, tid) == Status.PENDING

    # A detached task, with the session passed; a just-added task is flushed first.
    detached = row(tables, SchTask, tid)
    with Session(tables) as s:
        detached.cancel(s)
        new = SchTask(label="never flushed")
        s.add(new)
        new.cancel()
        s.commit()
        new_id = new.id
    assert status_of(tables, SchTask, tid) == Status.CANCELLED
    assert status_of(tables, SchTask, new_id) == Status.CANCELLED
    assert worker.process_all(SchTask, engine=tables) == 0


def test_cancel_of_a_retry_waiting_its_turn(tables: Engine) -> None:
    [tid] = add(tables, SchRetry(fail_runs=9))
    assert isinstance(worker.process_one(SchRetry, engine=tables), SchRetry)
    waiting = row(tables, SchRetry, tid)
    assert waiting.status == Status.PENDING
    with Session(tables) as s:
        task = s.get(SchRetry, tid)
        assert task is not None
        task.cancel()
        s.commit()
    wait_for_db_time(tables, waiting.run_at + timedelta(seconds=0.1))
    assert worker.process_all(SchRetry, engine=tables) == 0
    cancelled = row(tables, SchRetry, tid)
    assert cancelled.status == Status.CANCELLED
    assert (cancelled.alchq_attempts, cancelled.alchq_failures) == (1, 1)
    assert errors_of(tables, SchRetry, tid) == []


@pytest.mark.parametrize("end", ["PROCESSED", "ERROR"])
def test_cancel_of_a_finished_task_raises(tables: Engine, end: str) -> None:
    [tid] = add(tables, SchTask(fail="boom" if end == "ERROR" else None))
    assert worker.process_all(SchTask, engine=tables) == 1
    before = row(tables, SchTask, tid)
    assert before.status == Status(end)
    with Session(tables) as s:
        task = s.get(SchTask, tid)
        assert task is not None
        with pytest.raises(CancelError, match=f"SchTask {tid} is {end}"):
            task.cancel()
        s.commit()
    after = row(tables, SchTask, tid)
    assert (after.status, after.alchq_finished_at) == (before.status, before.alchq_finished_at)


def test_cancel_of_a_deleted_task_raises(tables: Engine) -> None:
    [tid] = add(tables, SchTask())
    with Session(tables) as s:
        task = s.get(SchTask, tid)
        assert task is not None
        s.execute(delete(SchTask).where(SchTask.id == tid))
        with pytest.raises(CancelError, match="deleted"):
            task.cancel()


def test_cancel_of_a_running_task_raises_and_the_task_finishes(
    tables: Engine, db_url: str, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    wp = spawn_worker("SchTask", db_url)
    with Session(tables) as s:
        slow, _ = SchTask.enqueue(s, unique_key="slow", sleep_ms=1500)
        s.commit()
        tid = slow.id
    wait_until(lambda: status_of(tables, SchTask, tid) == Status.PROCESSING, 30, "the claim")
    with Session(tables) as s:
        task = s.get(SchTask, tid)
        assert task is not None
        with pytest.raises(CancelError, match=f"SchTask {tid} is PROCESSING"):
            task.cancel()
        assert task.status == Status.PROCESSING
        s.rollback()
    with Session(tables) as s:  # a running task still holds its unique key
        held = SchTask.enqueue(s, unique_key="slow")
        assert (held.created, held.task.id) == (False, tid)
        s.commit()
    assert status_of(tables, SchTask, tid) == Status.PROCESSING
    wait_until(lambda: status_of(tables, SchTask, tid) == Status.PROCESSED, 30, "the task")
    stop(wp)
    assert runs_of(tables, SchTask) == [tid]
    with Session(tables) as s:
        assert s.scalar(select(func.count()).select_from(SchTask)) == 1


def test_cancel_of_an_unsaved_task_raises(tables: Engine) -> None:
    with pytest.raises(CancelError, match="not in a session"):
        SchTask().cancel()
    with Session(tables) as s, pytest.raises(CancelError, match="never saved"):
        SchTask().cancel(s)  # not added to s


def test_hand_written_cancelled_rows_are_accepted(tables: Engine) -> None:
    # The CHECK constraint knows the new status.
    [tid] = add(tables, SchTask())
    with tables.begin() as conn:
        conn.execute(update(SchTask).where(SchTask.id == tid).values(status="CANCELLED"))
    assert status_of(tables, SchTask, tid) == Status.CANCELLED
