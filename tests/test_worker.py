"""The worker: claiming, ordering, loops, stopping, transactions, sessions, logging.

Every database test runs on SQLite and PostgreSQL (the ``db_url`` fixture).
Task models are in tests/models_worker.py, so worker subprocesses can import
them too. Synchronisation is by polling with deadlines, never fixed sleeps.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import pytest
from flask import Flask, has_app_context
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import Engine, event, func, insert, inspect, select
from sqlalchemy.orm import Session, object_session, scoped_session, sessionmaker

import alchq
from alchq import BaseQueue, NoDatabaseError, Status, metadata, worker
from alchq.worker import Worker
from tests import models_worker as mw
from tests.conftest import ROOT, alchq_command, worker_env
from tests.models_worker import (
    WkComposite,
    WkDuplicate,
    WkFail,
    WkFlask,
    WkFlaskRetry,
    WkGate,
    WkPlain,
    WkSelfStatus,
    WkSide,
    WkSignalSelf,
    WkSpawn,
    WkStopper,
)
from tests.support import wait_until
from tests.tasks import CountTask, run_log

T = TypeVar("T", bound=BaseQueue)
LOGGER = "alchq.worker"


# -- helpers -------------------------------------------------------------------


@pytest.fixture
def tables(engine: Engine) -> Iterator[Engine]:
    """The engine, with every seed-form table created and the task models' state reset."""
    metadata.create_all(engine)
    mw.reset()
    yield engine
    mw.GATE_RELEASE.set()  # never leave a worker thread waiting
    mw.reset()


def add(engine: Engine, *tasks: BaseQueue) -> list[Any]:
    """Commit ``tasks`` and return their primary keys, in order."""
    with Session(engine, expire_on_commit=False) as s:
        s.add_all(tasks)
        s.commit()
        return [inspect(t).identity[0] for t in tasks]


def rows(engine: Engine, model: type[T]) -> list[T]:
    """Every row of ``model``, loaded and detached, in primary key order."""
    with Session(engine) as s:
        return list(s.scalars(select(model).order_by(*inspect(model).primary_key)))


def row(engine: Engine, model: type[T], pk: Any) -> T:
    with Session(engine) as s:
        task = s.get(model, pk)
        assert task is not None, f"{model.__name__} {pk} does not exist"
        return task


def status_of(engine: Engine, model: type[BaseQueue], pk: Any) -> Status | None:
    with Session(engine) as s:
        task = s.get(model, pk)
        return None if task is None else task.status


def side_notes(engine: Engine, task_id: int) -> list[str | None]:
    with Session(engine) as s:
        return list(s.scalars(select(WkSide.note).where(WkSide.task_id == task_id)))


def processed_one(model: type[T], **kwargs: Any) -> T:
    task = worker.process_one(model, **kwargs)
    assert isinstance(task, model), f"expected a {model.__name__}, got {task!r}"
    return task


class BackgroundCall:
    """Run ``fn`` in a daemon thread, keeping its result or exception."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None

        def target() -> None:
            try:
                self.result = fn()
            except BaseException as exc:  # SystemExit included
                self.error = exc

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def join(self, timeout: float = 10.0) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"still running after {timeout}s"
        if self.error is not None:
            raise self.error
        return self.result


class WorkerProcess:
    """An ``alchq run ...`` subprocess whose combined output is collected by a thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            alchq_command("run", *args),
            cwd=ROOT,
            env=worker_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker still running {timeout}s later; output:\n{self.output}"
            ) from None
        self._reader.join(5)
        return code

    def cpu_seconds(self) -> float:
        """utime + stime of the process, from /proc/PID/stat."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            stat = f.read()
        fields = stat[stat.rindex(")") + 2 :].split()  # fields from 3 (state) on
        utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15
        return (utime + stime) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def spawn_worker() -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def spawn(*args: str) -> WorkerProcess:
        wp = WorkerProcess(*args)
        started.append(wp)
        return wp

    yield spawn
    for wp in started:
        wp.close()


# -- process_one -------------------------------------------------------------------


def test_process_one_on_empty_queue_returns_none_without_waiting(
    tables: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALCHQ_POLL_INTERVAL", "60")
    calls: list[Callable[[], object]] = [
        lambda: worker.process_one(WkPlain, engine=tables),
        lambda: worker.process_one([WkPlain, WkGate], engine=tables),
        lambda: Worker(WkPlain, engine=tables, poll_interval=60).process_one(),
    ]
    for call in calls:
        start = time.monotonic()
        assert call() is None
        assert time.monotonic() - start < 1.0
    assert rows(tables, WkPlain) == []


def test_process_one_returns_the_finished_task_readable_after_return(tables: Engine) -> None:
    [tid] = add(tables, WkPlain())
    task = processed_one(WkPlain, engine=tables)
    assert object_session(task) is None  # the worker's session is closed
    assert task.id == tid
    assert task.status == Status.PROCESSED
    assert task.note == "ran"
    assert task.alchq_attempts == 1
    assert task.alchq_started_at is not None
    assert task.alchq_finished_at is not None
    assert task.alchq_finished_at >= task.alchq_started_at
    assert task.alchq_finished_at.tzinfo is not None
    assert task.alchq_worker is not None
    assert re.fullmatch(rf".+:{os.getpid()}:[0-9a-f]+", task.alchq_worker)
    assert task.alchq_error_type is None
    assert task.alchq_error_message is None
    assert task.alchq_traceback is None

    stored = row(tables, WkPlain, tid)
    assert stored.status == Status.PROCESSED
    assert stored.note == "ran"
    assert stored.alchq_attempts == 1
    assert stored.alchq_worker == task.alchq_worker
    assert stored.alchq_finished_at == task.alchq_finished_at


def test_process_one_claims_only_one_task(tables: Engine) -> None:
    # Regression: on PostgreSQL the claim's IN-subquery (LIMIT 1 ... SKIP LOCKED)
    # was re-run per row and one claim took several tasks.
    with Session(tables) as s:
        s.execute(insert(WkPlain), [{"note": f"n{i}"} for i in range(200)])
        s.commit()
    for done in range(1, 4):
        task = processed_one(WkPlain, engine=tables)
        assert task.alchq_attempts == 1
        everything = rows(tables, WkPlain)
        by_status = {st: [t for t in everything if t.status == st] for st in Status}
        assert len(by_status[Status.PROCESSED]) == done
        assert len(by_status[Status.PROCESSING]) == 0
        assert len(by_status[Status.ERROR]) == 0
        assert len(by_status[Status.PENDING]) == 200 - done
        for t in by_status[Status.PENDING]:
            assert t.alchq_attempts == 0
            assert t.alchq_worker is None
            assert t.alchq_started_at is None
            assert t.note != "ran"


def test_process_one_takes_oldest_first_ties_broken_by_primary_key(tables: Engine) -> None:
    t0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
    s = timedelta(seconds=1)
    # Inserted out of order; 3, 9 and 2 share a time_created.
    created = [(5, t0 + 3 * s), (3, t0 + s), (9, t0 + s), (1, t0 + 4 * s), (7, t0), (2, t0 + s)]
    add(tables, *(WkPlain(id=pk, time_created=when) for pk, when in created))
    add(tables, WkPlain(id=4))  # created now (database clock): the newest
    order = [processed_one(WkPlain, engine=tables).id for _ in range(7)]
    assert order == [7, 2, 3, 9, 5, 1, 4]
    assert worker.process_one(WkPlain, engine=tables) is None


# -- process_all / process_n -----------------------------------------------------------


def test_process_all_counts_tasks_created_by_run_and_error(tables: Engine) -> None:
    # spawn(children=2) -> child(1) -> child(0): 3 processed.
    # fail -> ERROR, error() adds a retry -> ERROR, no more retries: 2 processed.
    add(tables, WkSpawn(children=2), WkSpawn(fail=1))
    assert worker.process_all(WkSpawn, engine=tables) == 5
    everything = rows(tables, WkSpawn)
    assert sorted((t.status.value, t.children, t.fail, t.retries) for t in everything) == [
        ("ERROR", 0, 1, 0),
        ("ERROR", 0, 1, 1),
        ("PROCESSED", 0, 0, 0),
        ("PROCESSED", 1, 0, 0),
        ("PROCESSED", 2, 0, 0),
    ]
    assert all(t.alchq_attempts == 1 for t in everything)
    assert worker.process_all(WkSpawn, engine=tables) == 0


def test_process_all_serves_several_models(tables: Engine) -> None:
    add(tables, WkPlain(), WkPlain(), WkSpawn(children=1))
    assert worker.process_all([WkPlain, WkSpawn], engine=tables) == 4
    assert {t.status for t in rows(tables, WkPlain)} == {Status.PROCESSED}
    assert {t.status for t in rows(tables, WkSpawn)} == {Status.PROCESSED}


def test_process_n_processes_exactly_n_when_more_are_ready(tables: Engine) -> None:
    ids = add(tables, *(WkPlain() for _ in range(5)))
    assert worker.process_n(WkPlain, 3, engine=tables, poll_interval=0.05) == 3
    statuses = {t.id: t.status for t in rows(tables, WkPlain)}
    assert [statuses[i] for i in ids] == [Status.PROCESSED] * 3 + [Status.PENDING] * 2
    assert worker.process_n(WkPlain, 0, engine=tables, poll_interval=0.05) == 0
    with pytest.raises(ValueError):
        worker.process_n(WkPlain, -1, engine=tables)


def test_process_n_waits_for_tasks_created_later(tables: Engine) -> None:
    call = BackgroundCall(lambda: worker.process_n(WkPlain, 3, engine=tables, poll_interval=0.05))
    [first] = add(tables, WkPlain())
    wait_until(lambda: status_of(tables, WkPlain, first) == Status.PROCESSED, what="1st task")
    assert call.thread.is_alive()  # one done, the queue is empty: it waits for two more
    [second] = add(tables, WkPlain())
    wait_until(lambda: status_of(tables, WkPlain, second) == Status.PROCESSED, what="2nd task")
    assert call.thread.is_alive()
    [third, extra] = add(tables, WkPlain(), WkPlain())
    assert call.join(10) == 3
    assert status_of(tables, WkPlain, third) == Status.PROCESSED
    assert status_of(tables, WkPlain, extra) == Status.PENDING


# -- stopping ---------------------------------------------------------------------------


def test_worker_stop_from_another_thread_ends_an_idle_run_at_once(tables: Engine) -> None:
    [tid] = add(tables, WkPlain())  # before the start: the first look finds it
    w = Worker(WkPlain, engine=tables, poll_interval=60)
    call = BackgroundCall(w.run)
    wait_until(lambda: status_of(tables, WkPlain, tid) == Status.PROCESSED, what="the task")
    # Now idle in a 60 s poll wait: stop() must end it without waiting that out.
    assert call.thread.is_alive()
    stopped = time.monotonic()
    w.stop()
    call.join(5)
    assert time.monotonic() - stopped < 5
    assert w.stopping


def test_worker_stop_during_a_task_finishes_that_task_only(tables: Engine) -> None:
    w = Worker(WkGate, engine=tables, poll_interval=0.05)
    call = BackgroundCall(w.run)
    [first] = add(tables, WkGate())
    assert mw.GATE_ENTERED.wait(10)
    [second] = add(tables, WkGate())
    w.stop()
    mw.GATE_RELEASE.set()
    call.join(10)
    assert status_of(tables, WkGate, first) == Status.PROCESSED
    assert status_of(tables, WkGate, second) == Status.PENDING


def test_a_claim_handed_back_unrun_at_stop_is_not_counted(tables: Engine) -> None:
    # stop() lands between the claim's statement and its commit: the worker hands
    # the task back without running it, and alchq_attempts must not count that claim
    # (a later worker's run is the task's first).
    [tid] = add(tables, WkPlain())
    w = Worker(WkPlain, engine=tables, poll_interval=0.05)

    def stop_at_the_claim(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "UPDATE wk_plain" in statement and "alchq_lease_until" in statement:
            w.stop()

    event.listen(tables, "after_cursor_execute", stop_at_the_claim)
    try:
        w.run()
    finally:
        event.remove(tables, "after_cursor_execute", stop_at_the_claim)
    stored = row(tables, WkPlain, tid)
    assert stored.status == Status.PENDING
    assert stored.alchq_worker is None
    assert stored.alchq_attempts == 0
    task = processed_one(WkPlain, engine=tables)
    assert (task.id, task.alchq_attempts, task.note) == (tid, 1, "ran")


def test_system_exit_from_run_ends_the_task_and_the_worker_carries_on(tables: Engine) -> None:
    # sys.exit() in run() is the task's failure, not a request to stop the worker:
    # real signals reach the worker through its handlers.
    first, second = add(tables, WkStopper(), WkStopper())
    runner = Worker(WkStopper, engine=tables, poll_interval=0.05)
    call = BackgroundCall(runner.run)
    wait_until(
        lambda: status_of(tables, WkStopper, second) == Status.ERROR, what="both tasks to end"
    )
    runner.stop()
    call.join(10)
    for tid in (first, second):
        stored = row(tables, WkStopper, tid)
        assert stored.status == Status.ERROR
        assert stored.alchq_error_type == "SystemExit"
        assert stored.alchq_error_message == f"stopper {tid}"


def test_process_forever_in_main_thread_sigint_finishes_the_task_then_returns(
    tables: Engine,
) -> None:
    assert threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT)
    [first, second] = add(tables, WkSignalSelf(), WkSignalSelf())
    # If the worker never stops, a second SIGINT interrupts it (KeyboardInterrupt).
    watchdog = threading.Timer(15, os.kill, (os.getpid(), signal.SIGINT))
    watchdog.start()
    try:
        worker.process_forever(WkSignalSelf, engine=tables, poll_interval=0.05)
    except KeyboardInterrupt:
        pytest.fail("SIGINT was not turned into a clean stop")
    finally:
        watchdog.cancel()
    assert signal.getsignal(signal.SIGINT) is before
    done = row(tables, WkSignalSelf, first)
    assert done.status == Status.PROCESSED
    assert done.note == "finished after SIGINT"
    assert status_of(tables, WkSignalSelf, second) == Status.PENDING


def test_cli_worker_exits_0_on_sigint_while_idle(
    tables: Engine, db_url: str, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    wp = spawn_worker(
        "tests.models_worker:WkPlain", "--database-url", db_url, "--poll-interval", "0.1"
    )
    [tid] = add(tables, WkPlain())
    # Once a task is processed the loop runs, its signal handlers in place.
    wait_until(lambda: status_of(tables, WkPlain, tid) == Status.PROCESSED, 30, "the worker")
    wp.proc.send_signal(signal.SIGINT)
    assert wp.wait(timeout=5) == 0, wp.output
    assert "SIGINT received" in wp.output
    assert "Traceback" not in wp.output


def test_cli_worker_sigterm_during_a_slow_task_finishes_it_and_exits_0(
    tables: Engine, db_url: str, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    wp = spawn_worker("tests.tasks:CountTask", "--database-url", db_url, "--poll-interval", "0.1")
    [slow] = add(tables, CountTask(sleep=1500))
    wait_until(lambda: status_of(tables, CountTask, slow) == Status.PROCESSING, 30, "the claim")
    [later] = add(tables, CountTask())
    wp.proc.send_signal(signal.SIGTERM)
    assert wp.wait(timeout=15) == 0, wp.output
    assert "SIGTERM received" in wp.output
    assert status_of(tables, CountTask, slow) == Status.PROCESSED
    assert status_of(tables, CountTask, later) == Status.PENDING
    with Session(tables) as s:
        assert s.execute(select(run_log.c.task_id, run_log.c.pid)).all() == [(slow, wp.proc.pid)]


def test_idle_cli_worker_uses_little_cpu(
    tables: Engine, db_url: str, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    wp = spawn_worker(
        "tests.models_worker:WkPlain", "--database-url", db_url, "--poll-interval", "0.2"
    )
    [tid] = add(tables, WkPlain())
    wait_until(lambda: status_of(tables, WkPlain, tid) == Status.PROCESSED, 30, "the worker")
    before = wp.cpu_seconds()
    time.sleep(3)  # the measurement window, not synchronisation
    used = wp.cpu_seconds() - before
    assert wp.proc.poll() is None, wp.output
    assert used < 0.3, f"idle worker used {used:.2f}s of CPU in 3s"
    wp.proc.send_signal(signal.SIGINT)
    assert wp.wait(timeout=5) == 0, wp.output


# -- transactions ------------------------------------------------------------------------


def test_task_is_processing_and_owned_while_run_executes(tables: Engine) -> None:
    [tid] = add(tables, WkGate())
    w = Worker(WkGate, engine=tables, name="gate-worker")
    call = BackgroundCall(w.process_one)
    assert mw.GATE_ENTERED.wait(10)
    seen = row(tables, WkGate, tid)
    assert seen.status == Status.PROCESSING
    assert seen.alchq_worker == "gate-worker"
    assert seen.alchq_attempts == 1
    assert seen.alchq_started_at is not None
    assert seen.alchq_finished_at is None
    assert seen.note is None  # run()'s changes are not committed yet
    assert side_notes(tables, tid) == []
    mw.GATE_RELEASE.set()
    task = call.join(10)
    assert isinstance(task, WkGate)
    assert task.status == Status.PROCESSED
    done = row(tables, WkGate, tid)
    assert done.status == Status.PROCESSED
    assert done.note == "ran"
    assert done.alchq_worker == "gate-worker"
    assert side_notes(tables, tid) == ["gate"]


def test_failing_run_is_rolled_back_and_recorded_then_error_called_once(
    tables: Engine,
) -> None:
    [tid] = add(tables, WkFail(mode="none"))
    task = processed_one(WkFail, engine=tables)
    assert task.status == Status.ERROR
    assert task.alchq_error_type == "ValueError"
    assert task.alchq_error_message == f"boom {tid}"

    stored = row(tables, WkFail, tid)
    assert stored.status == Status.ERROR
    assert stored.note is None  # run()'s change rolled back
    assert side_notes(tables, tid) == []  # and its flushed row too
    assert stored.alchq_attempts == 1
    assert stored.alchq_finished_at is not None
    assert stored.alchq_error_type == "ValueError"
    assert stored.alchq_error_message == f"boom {tid}"
    assert stored.alchq_traceback is not None
    assert "explode_in_wkfail" in stored.alchq_traceback
    assert f"ValueError: boom {tid}" in stored.alchq_traceback

    assert len(mw.RAISED) == 1
    assert len(mw.ERROR_CALLS) == 1
    call = mw.ERROR_CALLS[0]
    assert call["id"] == tid
    assert call["exc"] is mw.RAISED[0][1]  # the very exception run() raised
    assert call["status_seen_elsewhere"] == Status.ERROR  # committed before error()
    assert call["status"] == Status.ERROR
    assert call["error_type"] == "ValueError"


def test_rows_committed_by_error_stay(tables: Engine) -> None:
    # "retry": error() commits its retry itself, as the seed does; "retry-nocommit":
    # error() only adds it and the worker commits. Each retry fails once more and
    # stops there (retries=1).
    [committing, leaving] = add(tables, WkFail(mode="retry"), WkFail(mode="retry-nocommit"))
    assert worker.process_all(WkFail, engine=tables) == 4
    everything = rows(tables, WkFail)
    assert everything[0].id == committing
    assert everything[1].id == leaving
    assert sorted((t.mode, t.retries, t.status.value) for t in everything) == [
        ("retry", 0, "ERROR"),
        ("retry", 1, "ERROR"),
        ("retry-nocommit", 0, "ERROR"),
        ("retry-nocommit", 1, "ERROR"),
    ]
    assert sorted(c["id"] for c in mw.ERROR_CALLS) == [t.id for t in everything]


def test_error_that_raises_is_logged_and_the_worker_goes_on(
    tables: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    [broken, fine] = add(tables, WkFail(mode="raise"), WkFail(mode="none"))
    assert worker.process_all(WkFail, engine=tables) == 2
    assert status_of(tables, WkFail, broken) == Status.ERROR
    assert status_of(tables, WkFail, fine) == Status.ERROR
    assert sorted(c["id"] for c in mw.ERROR_CALLS) == [broken, fine]
    errors = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    message = errors[0].getMessage()
    assert re.search(rf"\bWkFail {broken}\b", message)
    assert "error() raised TypeError" in message
    assert f"error handler of {broken} broke" in message


def test_run_setting_status_itself_ends_the_task_in_error_once(tables: Engine) -> None:
    """alchq's columns are alchq's: a run that changes status ends in ERROR (its other
    changes rolled back), once; setting the status it already has changes nothing."""
    values = [st.value for st in Status]
    ok = add(tables, *(WkSelfStatus(set_to=v) for v in values))
    failing = add(tables, *(WkSelfStatus(set_to=v, fail=1) for v in values))
    assert worker.process_all(WkSelfStatus, engine=tables) == 2 * len(values)
    for tid, value in zip(ok, values, strict=True):
        done = row(tables, WkSelfStatus, tid)
        if value == Status.PROCESSING:
            assert (done.status, done.note) == (Status.PROCESSED, "ran"), value
            continue
        assert (done.status, done.note, done.alchq_error_type) == (
            Status.ERROR,
            None,
            "alchq.exceptions.TaskFailure",
        ), value
        assert "run() changed status" in (done.alchq_error_message or ""), value
        assert done.alchq_attempts == 1
    for tid, value in zip(failing, values, strict=True):
        failed = row(tables, WkSelfStatus, tid)
        assert (failed.status, failed.note, failed.alchq_error_type) == (
            Status.ERROR,
            None,
            "ValueError",
        ), value
    assert worker.process_all(WkSelfStatus, engine=tables) == 0


# -- session sources -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["engine", "sessionmaker", "scoped_session", "callable"])
def test_session_sources(tables: Engine, kind: str) -> None:
    scoped: scoped_session[Session] | None = None
    kwargs: dict[str, Any]
    if kind == "engine":
        kwargs = {"engine": tables}
    elif kind == "sessionmaker":
        kwargs = {"session_factory": sessionmaker(tables)}
    elif kind == "scoped_session":
        scoped = scoped_session(sessionmaker(tables))
        kwargs = {"session_factory": scoped}
    else:
        kwargs = {"session_factory": lambda: Session(tables)}
    try:
        [first, *_rest] = add(tables, WkPlain(), WkPlain(), WkPlain())
        task = processed_one(WkPlain, **kwargs)
        if kind != "callable":  # see test_task_from_a_plain_callable_factory_is_readable
            assert task.id == first
            assert task.status == Status.PROCESSED
            assert task.note == "ran"
            assert task.alchq_attempts == 1
        stored = row(tables, WkPlain, first)
        assert stored.status == Status.PROCESSED
        assert stored.note == "ran"
        assert worker.process_all(WkPlain, **kwargs) == 2
        assert [t.status for t in rows(tables, WkPlain)] == [Status.PROCESSED] * 3
    finally:
        if scoped is not None:
            scoped.remove()


def test_task_from_a_plain_callable_factory_is_readable(tables: Engine) -> None:
    [tid] = add(tables, WkPlain())
    task = processed_one(WkPlain, session_factory=lambda: Session(tables))
    assert task.id == tid
    assert task.status == Status.PROCESSED
    assert task.alchq_attempts == 1
    assert task.alchq_finished_at is not None


def test_no_database_outside_flask_raises_no_database_error() -> None:
    assert not has_app_context()
    calls: list[Callable[[], object]] = [
        lambda: worker.process_one(WkPlain),
        lambda: worker.process_all(WkPlain),
        lambda: worker.process_n(WkPlain, 1),
        lambda: worker.process_forever(WkPlain),
        lambda: Worker(WkPlain),
    ]
    for call in calls:
        with pytest.raises(NoDatabaseError) as info:
            call()
        assert "session_factory" in str(info.value)
        assert "engine" in str(info.value)


def test_flask_app_without_flask_sqlalchemy_raises_no_database_error() -> None:
    app = Flask(__name__)
    with app.app_context(), pytest.raises(NoDatabaseError) as info:
        worker.process_one(WkPlain)
    assert "Flask-SQLAlchemy" in str(info.value)
    assert "session_factory" in str(info.value)


@pytest.fixture
def flask_db(db_url: str, tables: Engine) -> Iterator[tuple[Flask, SQLAlchemy]]:
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = db_url
    db = SQLAlchemy(app)
    yield app, db
    with app.app_context():
        db.session.remove()
        for eng in db.engines.values():
            eng.dispose()


def test_flask_sqlalchemy_app_context_needs_no_argument(
    tables: Engine, flask_db: tuple[Flask, SQLAlchemy]
) -> None:
    app, db = flask_db
    [first, second] = add(tables, WkFlask(), WkFlask())
    with app.app_context():
        task = processed_one(WkFlask)
        assert task.id == first
        assert task.status == Status.PROCESSED
        assert worker.process_all(WkFlask) == 1
    # db.session inside run() was the task's own session...
    assert mw.FLASK_SEEN == {first: True, second: True}
    # ...so what run() added to it, uncommitted, was committed with PROCESSED.
    assert [t.status for t in rows(tables, WkFlask)] == [Status.PROCESSED] * 2
    assert side_notes(tables, first) == ["flask"]
    assert side_notes(tables, second) == ["flask"]


def test_flask_seed_retry_pattern_through_db_session(
    tables: Engine, flask_db: tuple[Flask, SQLAlchemy]
) -> None:
    app, _db = flask_db
    add(tables, WkFlaskRetry())
    with app.app_context():
        assert worker.process_all(WkFlaskRetry) == 3
    everything = rows(tables, WkFlaskRetry)
    assert [(t.status, t.retries) for t in everything] == [
        (Status.ERROR, 0),
        (Status.ERROR, 1),
        (Status.ERROR, 2),
    ]
    assert {t.alchq_error_type for t in everything} == {"RuntimeError"}


# -- logging -----------------------------------------------------------------------------


def test_log_lines_for_each_task(tables: Engine, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    ok_ids = add(tables, WkPlain(), WkPlain())
    [failed] = add(tables, WkFail(mode="none"))
    assert worker.process_all(WkPlain, engine=tables) == 2
    assert worker.process_all(WkFail, engine=tables) == 1
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]

    def matching(pattern: str) -> list[int]:
        return [level for level, msg in lines if re.fullmatch(pattern, msg)]

    for tid in ok_ids:
        assert matching(rf"WkPlain {tid} started \(attempt 1\)") == [logging.INFO]
        assert matching(rf"WkPlain {tid} PROCESSED in \d+\.\d+s") == [logging.INFO]
    assert matching(rf"WkFail {failed} started \(attempt 1\)") == [logging.INFO]
    assert matching(rf"WkFail {failed} ERROR in \d+\.\d+s: ValueError: boom {failed}") == [
        logging.WARNING
    ]
    assert matching(rf"WkFail {failed} PROCESSED.*") == []
    with Session(tables) as s:
        assert s.scalar(select(func.count()).select_from(WkPlain)) == 2


def test_run_whose_changes_cannot_be_flushed_is_an_error(tables: Engine) -> None:
    add(tables, WkSide(id=mw.DUPLICATE_SIDE_ID, task_id=0, note="first"))
    [tid, other] = add(tables, WkDuplicate(), WkPlain())
    task = processed_one(WkDuplicate, engine=tables)
    assert task.status == Status.ERROR
    stored = row(tables, WkDuplicate, tid)
    assert stored.status == Status.ERROR
    assert stored.note is None
    assert stored.alchq_error_type == "sqlalchemy.exc.IntegrityError"
    assert side_notes(tables, tid) == []
    # the worker's connection is usable afterwards
    assert processed_one(WkPlain, engine=tables).id == other


def test_a_composite_primary_key_is_claimed_rescued_and_pruned(tables: Engine) -> None:
    """(a, b) IN (SELECT a, b ...): the claim, the rescue and prune's batches once
    selected the key as one tuple column, which the databases reject."""
    add(tables, *(WkComposite(tenant=t, name=n) for t in (1, 2) for n in ("a", "b")))
    assert worker.process_all(WkComposite, engine=tables) == 4
    with Session(tables) as s:
        assert {(t.tenant, t.name, t.status, t.note) for t in s.scalars(select(WkComposite))} == {
            (t, n, Status.PROCESSED, "ran") for t in (1, 2) for n in ("a", "b")
        }
    assert alchq.prune(WkComposite, engine=tables, processed=0, batch_size=3) == {
        "PROCESSED": 4,
        "ERROR": 0,
        "CANCELLED": 0,
    }


def test_forgetting_gone_workers_skips_a_registry_row_a_frozen_heartbeat_holds(
    engine: Engine,
) -> None:
    """A worker frozen inside its heartbeat's transaction holds its registry row: the
    rescue's clean-up of long-gone workers must not wait for it (on MySQL a DELETE
    waits even for a row its WHERE leaves out, and the rescue then never ran)."""
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite: the frozen heartbeat would hold the whole file")
    from alchq._dialects import dialect_for, utc_now
    from alchq._registry import forget_gone
    from alchq.model import task_table, workers_table

    metadata.create_all(engine)
    table = task_table(CountTask)
    workers = workers_table(table.metadata)
    row = {"host": "h", "pid": 1, "models": "CountTask", "version": "0"}
    with engine.begin() as conn:
        conn.execute(insert(workers).values(**row, id="frozen", expires_at=utc_now(60)))
        conn.execute(insert(workers).values(**row, id="gone", expires_at=utc_now(-2 * 3600)))
    with engine.connect() as frozen:
        frozen.execute(
            workers.update().where(workers.c.id == "frozen").values(heartbeat_at=utc_now())
        )  # held, uncommitted
        with engine.connect() as conn:
            dialect = dialect_for(engine)
            with conn.begin(), dialect.short_lock_wait(conn, 2):
                assert forget_gone(conn, table, dialect) == 1
        frozen.rollback()
    with engine.connect() as conn:
        assert set(conn.execute(select(workers.c.id)).scalars()) == {"frozen"}
