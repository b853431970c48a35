"""Hardening: every way a task can fail is that task's failure (the hardening issue).

One test (or a few) per item of the issue, with real ``alchq run`` processes on
SQLite and PostgreSQL wherever the item applies. Tasks are the fault suite's
FaultTask (tests/fault_tasks.py); each scenario ends with the fault suite's
invariants where they apply.
"""

from __future__ import annotations

import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from alchq import Status
from alchq._outcome import CONFLICT_RETRY
from tests.conftest import run_alchq
from tests.fault_tasks import fault_counter
from tests.faults.conftest import (
    GRACE_PERIOD,
    LEASE,
    PgDatabase,
    Queue,
    WorkerProc,
    Workers,
    check_invariants,
)
from tests.support import wait_until

LOST = "alchq.exceptions.WorkerLostError"
FAILURE = "alchq.exceptions.TaskFailure"
TIMEOUT = "alchq.exceptions.TaskTimeoutError"


def _settled(queue: Queue, workers: Workers, timeout: float = 30) -> None:
    wait_until(
        queue.settled,
        timeout,
        "every task done",
        lambda: f"{queue.describe()}\n{workers.describe()}",
        interval=0.2,
    )


def _errors_called(queue: Queue, task: int, times: int = 1, timeout: float = 15) -> None:
    wait_until(
        lambda: queue.row(task).errors == times and queue.row(task).alchq_lease_until is None,
        timeout,
        f"error() of {task} to commit",
        lambda: str(queue.row(task)),
    )


def _pg_only(queue: Queue) -> None:
    if queue.dialect != "postgresql":
        pytest.skip("PostgreSQL only")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _no_traceback(worker: WorkerProc) -> None:
    out = worker.output()
    assert "Traceback" not in out, out


# -- 1. a database error raised by run() is a task failure ----------------------------------------


@pytest.mark.parametrize("action", ["other_db", "sqlite_unopenable", "statement_timeout"])
def test_a_database_error_raised_by_run_is_the_tasks_failure(
    queue: Queue, workers: Workers, action: str
) -> None:
    """Counted, retried by the model's policy with its backoff, then ERROR and error() once;
    the queue behind it moves."""
    if action == "statement_timeout":
        _pg_only(queue)
    env = {
        "FAULT_RETRY": "3",
        "FAULT_DEAD_URL": f"postgresql+psycopg://u@127.0.0.1:{_free_port()}/x",
    }
    bad, *after = queue.add_many([{"action": action}] + [{"action": "ok"}] * 3)
    w = workers.start(env=env)
    _settled(queue, workers, 40)
    _errors_called(queue, bad)
    row = queue.row(bad)
    assert row.status == Status.ERROR, row
    assert row.alchq_failures == 3 and row.alchq_attempts == 3, row
    assert row.alchq_lost_claims == 0
    assert len(queue.starts(bad)) == 3
    assert all(queue.row(t).status == Status.PROCESSED for t in after)
    assert w.alive()
    check_invariants(queue, releases={bad: 2})  # two retries
    workers.stop_all_cleanly()


def test_lock_timeout_raised_by_run_is_the_tasks_failure(queue: Queue, workers: Workers) -> None:
    _pg_only(queue)
    (bad,) = queue.add(action="lock_timeout")
    w = workers.start()
    _settled(queue, workers, 30)
    _errors_called(queue, bad)
    row = queue.row(bad)
    assert row.status == Status.ERROR and row.alchq_failures == 1, row
    assert "LockNotAvailable" in row.alchq_error_type or "lock" in row.alchq_error_message
    assert w.alive()
    workers.stop_all_cleanly()


def test_a_task_that_keeps_losing_its_connection_ends(queue: Queue, workers: Workers) -> None:
    """idle_in_transaction_session_timeout ends the task's connection every run, while the
    database stays up: it ends after max_lost_claims runs, saying why."""
    _pg_only(queue)
    bad, after = queue.add_many([{"action": "idle_timeout", "sleep": 800}, {"action": "ok"}])
    w = workers.start()
    _settled(queue, workers, 60)
    _errors_called(queue, bad)
    row = queue.row(bad)
    assert row.status == Status.ERROR and row.alchq_error_type == LOST, row
    assert "lost its database connection" in row.alchq_error_message
    assert row.alchq_lost_claims == 3 and len(queue.starts(bad)) == 3
    assert queue.done(bad) == []  # its writes died with the connection each time
    assert queue.row(after).status == Status.PROCESSED
    assert w.alive()
    check_invariants(queue)
    workers.stop_all_cleanly()


# -- 2. isolation levels --------------------------------------------------------------------------


def _set_isolation(queue: Queue, level: str) -> None:
    name = queue.engine.url.database
    admin = create_engine(queue.engine.url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(
                text(f"ALTER DATABASE \"{name}\" SET default_transaction_isolation = '{level}'")
            )
    finally:
        admin.dispose()
    queue.engine.dispose()


@pytest.mark.parametrize("level", ["repeatable read", "serializable"])
def test_writing_tasks_longer_than_the_heartbeat_finish_under_any_isolation_level(
    queue: Queue, workers: Workers, level: str
) -> None:
    """One worker: nothing but its own bookkeeping runs beside the task, and that never
    conflicts with the task's transaction, so every task finishes at its first run."""
    _pg_only(queue)
    _set_isolation(queue, level)
    ids = queue.add(3, action="ok", sleep=1500)  # three heartbeats each
    w = workers.start()
    _settled(queue, workers, 40)
    for task in ids:
        row = queue.row(task)
        assert row.status == Status.PROCESSED and row.alchq_attempts == 1, row
    assert "failed" not in w.output(), w.output()
    check_invariants(queue)
    workers.stop_all_cleanly()


def test_concurrent_serializable_tasks_all_finish(queue: Queue, workers: Workers) -> None:
    """Two workers under SERIALIZABLE: tasks that lose to each other are run again."""
    _pg_only(queue)
    _set_isolation(queue, "serializable")
    ids = queue.add(10, action="ok", sleep=300)
    workers.start()
    workers.start()
    _settled(queue, workers, 60)
    assert all(queue.row(t).status == Status.PROCESSED for t in ids), queue.describe()
    rows = queue.rows()
    check_invariants(queue, releases={t: rows[t].alchq_failures for t in ids})
    workers.stop_all_cleanly()


def test_a_serialization_failure_of_runs_own_writes_is_retried_and_bounded(
    queue: Queue, workers: Workers
) -> None:
    _pg_only(queue)
    _set_isolation(queue, "repeatable read")
    with queue.engine.begin() as conn:
        conn.execute(fault_counter.insert().values(id=1, n=0))
    once, always = queue.add_many([{"action": "serialize_once"}, {"action": "serialize_always"}])
    w = workers.start()
    _settled(queue, workers, 40)
    _errors_called(queue, always)
    first, second = queue.row(once), queue.row(always)
    assert first.status == Status.PROCESSED and first.alchq_failures == 1, first
    assert second.status == Status.ERROR, second
    assert second.alchq_failures == CONFLICT_RETRY.attempts, second  # bounded
    assert "SerializationFailure" in second.alchq_error_message
    assert w.alive()
    check_invariants(queue, releases={once: 1, always: CONFLICT_RETRY.attempts - 1})
    workers.stop_all_cleanly()


# -- 3. run() that swallows a database error ------------------------------------------------------


def test_run_that_swallows_a_database_error_ends_in_error(queue: Queue, workers: Workers) -> None:
    _pg_only(queue)
    bad, after = queue.add_many([{"action": "swallow"}, {"action": "ok"}])
    w = workers.start()
    _settled(queue, workers)
    _errors_called(queue, bad)
    row = queue.row(bad)
    assert row.status == Status.ERROR and row.alchq_error_type == FAILURE, row
    assert "aborted" in row.alchq_error_message
    assert queue.done(bad) == []
    assert queue.row(after).status == Status.PROCESSED
    assert w.alive()
    _no_traceback(w)
    workers.stop_all_cleanly()


# -- 4. messages that are not clean text ----------------------------------------------------------


@pytest.mark.parametrize("concurrency", [None, "2"])
def test_exceptions_with_unstorable_messages_end_their_task(
    queue: Queue, workers: Workers, concurrency: str | None
) -> None:
    plan = ["nul", "surrogate", "bad_str", "huge", "ok"]
    ids = queue.add_many([{"action": a} for a in plan])
    args = ("--concurrency", concurrency) if concurrency else ()
    w = workers.start(*args)
    _settled(queue, workers, 40)
    rows = queue.rows()
    for task, action in zip(ids, plan, strict=True):
        row = rows[task]
        if action == "ok":
            assert row.status == Status.PROCESSED
            continue
        assert row.status == Status.ERROR, (action, row.status)
        assert row.alchq_error_type == "ValueError", (action, row.alchq_error_type)
        assert row.alchq_lost_claims == 0 and row.alchq_attempts == 1, action
        message = row.alchq_error_message
        assert "\x00" not in message and len(message) <= 4_000, action
        assert len(row.alchq_traceback) <= 60_000, action
        message.encode("utf-8")  # storable and readable back
    assert "\\x00" in rows[ids[0]].alchq_error_message
    assert "__str__ failed" in rows[ids[2]].alchq_error_message
    for task in ids[:-1]:
        _errors_called(queue, task)
    assert w.alive()
    longest = max(len(line) for line in w.output().splitlines())
    assert longest < 2_000, f"a log line of {longest} characters"
    check_invariants(queue)
    workers.stop_all_cleanly()


# -- 5. run() or error() that closes, removes or expunges the session -----------------------------


def test_run_and_error_that_close_or_expunge_the_session(queue: Queue, workers: Workers) -> None:
    closed, closed_raise, expunged, error_closes, after = queue.add_many(
        [
            {"action": "close_session"},
            {"action": "close_raise"},
            {"action": "expunge"},
            {"action": "error_closes"},
            {"action": "ok"},
        ]
    )
    w = workers.start()
    _settled(queue, workers)
    rows = queue.rows()
    # Returned normally: PROCESSED; the writes a close discarded are gone.
    assert rows[closed].status == Status.PROCESSED and queue.done(closed) == []
    # Raised after closing: ERROR, and error() is called.
    assert rows[closed_raise].status == Status.ERROR
    _errors_called(queue, closed_raise)
    # Expunged itself, then wrote through the session: PROCESSED with its write.
    assert rows[expunged].status == Status.PROCESSED and len(queue.done(expunged)) == 1
    # error() that closes its session: its uncommitted change is discarded, said so.
    assert rows[error_closes].status == Status.ERROR
    wait_until(lambda: queue.row(error_closes).alchq_lease_until is None, 10, "error() done")
    assert queue.row(error_closes).errors == 0
    assert "error() closed its session" in w.output()
    assert rows[after].status == Status.PROCESSED
    assert w.alive()
    _no_traceback(w)
    check_invariants(queue)
    workers.stop_all_cleanly()


# -- 6. run() that changes its own row's bookkeeping ----------------------------------------------


@pytest.mark.parametrize("action", ["set_status", "core_status", "set_attempts"])
def test_run_that_changes_alchqs_columns_ends_in_error_once(
    queue: Queue, workers: Workers, action: str
) -> None:
    bad, after = queue.add_many([{"action": action}, {"action": "ok"}])
    w = workers.start()
    _settled(queue, workers)
    _errors_called(queue, bad)
    row = queue.row(bad)
    assert row.status == Status.ERROR and row.alchq_error_type == FAILURE, row
    assert "alchq's own columns" in row.alchq_error_message
    assert row.alchq_attempts == 1 and len(queue.starts(bad)) == 1
    assert queue.done(bad) == []  # its writes were rolled back
    assert queue.row(after).status == Status.PROCESSED
    assert "no longer holds the claim" not in w.output()
    check_invariants(queue)
    workers.stop_all_cleanly()


def test_run_that_deletes_its_own_row_is_done(queue: Queue, workers: Workers) -> None:
    gone, after = queue.add_many([{"action": "delete_self"}, {"action": "ok"}])
    w = workers.start()
    _settled(queue, workers)
    assert gone not in queue.rows()
    assert len(queue.done(gone)) == 1  # its other writes were committed
    assert queue.starts(gone) == [w.pid]
    assert queue.row(after).status == Status.PROCESSED
    assert "deleted its own row" in w.output()
    workers.stop_all_cleanly()


# -- 7. model settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, attribute",
    [
        ("BadNone", "alchq_time_limit"),
        ("BadZero", "alchq_time_limit"),
        ("BadText", "alchq_time_limit"),
        ("BadNan", "alchq_time_limit"),
        ("BadErrorLimit", "alchq_error_time_limit"),
    ],
)
def test_bad_model_settings_are_refused_before_anything_is_claimed(
    queue: Queue, model: str, attribute: str
) -> None:
    (task,) = queue.add(action="ok")
    done = run_alchq(
        "run", f"tests.bad_settings_tasks:{model}", "--database-url", queue.url, "--burst"
    )
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert model in lines[0] and attribute in lines[0], lines[0]
    assert queue.row(task).status == Status.PENDING


# -- 8. a task that holds the interpreter ------------------------------------------------------


def test_a_task_holding_the_interpreter_is_never_taken_over(queue: Queue, workers: Workers) -> None:
    """Its worker's own threads cannot run for twice the lease: the supervisor keeps it."""
    (task,) = queue.add(action="gil", sleep=int(LEASE * 2000))
    first = workers.start()
    wait_until(lambda: first.pid in queue.starts(task), 20, "the task to start", first.tail)
    second = workers.start()  # idle, looking for lost claims every second
    _settled(queue, workers, LEASE * 2 + 20)
    row = queue.row(task)
    assert row.status == Status.PROCESSED, row
    assert row.alchq_attempts == 1 and row.alchq_lost_claims == 0, row
    assert queue.starts(task) == [first.pid]
    assert "lost" not in second.output()
    check_invariants(queue)
    workers.stop_all_cleanly()


@pytest.mark.parametrize("action", ["gil", "gil_hard"])
def test_a_task_holding_the_interpreter_past_its_time_limit_is_stopped(
    queue: Queue, workers: Workers, action: str
) -> None:
    """Stopped within kill_after of its limit: by the supervisor's signal, or, when it
    ignores that, by replacing its worker process; the worker carries on."""
    slow, after = queue.add_many([{"action": action, "sleep": 30_000}, {"action": "ok"}])
    w = workers.start(env={"FAULT_TIME_LIMIT": "2"})
    wait_until(lambda: queue.starts(slow), 20, "the task to start", w.tail)
    started = time.monotonic()
    wait_until(lambda: queue.row(slow).status == Status.ERROR, 30, "the timeout", w.tail)
    took = time.monotonic() - started
    assert took < 2 + 1 + 2.5, f"stopped {took:.1f}s after it started (limit 2s, kill_after 1s)"
    _settled(queue, workers)
    _errors_called(queue, slow)
    row = queue.row(slow)
    assert row.alchq_error_type == TIMEOUT, row
    assert queue.row(after).status == Status.PROCESSED
    assert w.alive()
    if action == "gil_hard":
        assert "replacing its worker process" in w.output(), w.output()
    check_invariants(queue)
    workers.stop_all(timeout=20)


# -- 9. a signal during a claim -------------------------------------------------------------------


def test_a_task_claimed_after_sigterm_is_released_at_once(queue: Queue, workers: Workers) -> None:
    """SQLite: the worker's claim waits behind the test's write lock when SIGTERM comes."""
    if queue.dialect != "sqlite":
        pytest.skip("needs a claim that waits: SQLite's write lock")
    w = workers.start()
    wait_until(lambda: "serving FaultTask" in w.output(), 20, "the worker to start", w.tail)
    time.sleep(1)
    raw = sqlite3.connect(str(queue.engine.url.database), timeout=10, isolation_level=None)
    try:
        raw.execute("BEGIN IMMEDIATE")
        raw.execute("INSERT INTO fault_task (action, sleep, errors) VALUES ('ok', 30000, 0)")
        (task,) = raw.execute("SELECT max(id) FROM fault_task").fetchone()
        time.sleep(0.8)  # the worker's next claim now waits for the lock
        w.send(signal.SIGTERM)
        time.sleep(0.3)
        raw.execute("COMMIT")
    finally:
        raw.close()
    assert w.wait(GRACE_PERIOD + 5) == 0, w.output()
    row = queue.row(task)
    assert row.status == Status.PENDING, row
    assert queue.starts(task) == []


def test_sighup_stops_a_worker_gracefully(queue: Queue, workers: Workers) -> None:
    (task,) = queue.add(action="ok", sleep=1000)
    w = workers.start()
    wait_until(lambda: w.pid in queue.starts(task), 20, "the task to start", w.tail)
    w.send(signal.SIGHUP)
    assert w.wait(GRACE_PERIOD + 10) == 0, w.output()
    assert queue.row(task).status == Status.PROCESSED
    check_invariants(queue)


# -- 10. error() has its own time -----------------------------------------------------------------


def test_a_slow_error_is_stopped_and_what_it_wrote_committed(
    queue: Queue, workers: Workers
) -> None:
    slow, after = queue.add_many([{"action": "slow_error"}, {"action": "ok"}])
    w = workers.start(env={"FAULT_ERROR_TIME_LIMIT": "1", "FAULT_TIME_LIMIT": "60"})
    _settled(queue, workers)
    _errors_called(queue, slow)
    assert queue.row(after).status == Status.PROCESSED
    assert "error() was stopped after 1s; what it had written was committed" in w.output()
    assert w.alive()
    assert w.output().count("serving FaultTask") == 1  # not replaced: error() was interrupted
    workers.stop_all_cleanly()


def test_an_uninterruptible_error_is_called_again_after_its_process_is_replaced(
    queue: Queue, workers: Workers, tmp_path: Path
) -> None:
    stuck, after = queue.add_many([{"action": "hard_error_once"}, {"action": "ok"}])
    w = workers.start(env={"FAULT_ERROR_TIME_LIMIT": "1", "FAULT_MARKERS": str(tmp_path)})
    _settled(queue, workers)
    _errors_called(queue, stuck, timeout=30)  # the first call's write was lost, the second's kept
    assert queue.row(after).status == Status.PROCESSED
    assert w.alive()
    assert w.output().count("serving FaultTask") == 2, w.output()  # replaced once
    workers.stop_all(timeout=20)


# -- 11. error()'s writes and a connection blip ---------------------------------------------------


def test_error_whose_commit_is_lost_is_called_again(pg_db: PgDatabase, tmp_path: Path) -> None:
    queue = Queue(pg_db.url)
    try:
        with Workers(pg_db.url, tmp_path / "workers") as workers:
            (task,) = queue.add(action="error_blip")
            w = workers.start(env={"FAULT_MARKERS": str(tmp_path)})
            wait_until(
                lambda: (tmp_path / f"{task}.in_error").exists(), 20, "error() to run", w.tail
            )
            assert pg_db.terminate_backends() >= 1
            _settled(queue, workers)
            _errors_called(queue, task)
            out = w.output()
            assert "error() raised" not in out, out
            assert "calling it again" in out or "could not be committed" in out, out
            assert w.alive()
            workers.stop_all_cleanly()
    finally:
        queue.dispose()


# -- 12. write tracking ---------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["cte_write", "function_write"])
def test_writes_run_hid_in_a_cte_or_function_are_not_lost(
    pg_db: PgDatabase, tmp_path: Path, action: str
) -> None:
    """The server goes down after run() wrote (in a WITH or through a function): the task
    must run again, not be recorded PROCESSED without its write."""
    queue = Queue(pg_db.url)
    try:
        with queue.engine.begin() as conn:
            conn.execute(
                text(
                    "CREATE OR REPLACE FUNCTION fault_write(t integer, p integer) RETURNS integer "
                    "AS $$ INSERT INTO fault_done (task_id, pid) VALUES (t, p) RETURNING id $$ "
                    "LANGUAGE sql"
                )
            )
        with Workers(pg_db.url, tmp_path / "workers") as workers:
            (task,) = queue.add(action=action, sleep=1500)
            w = workers.start()
            wait_until(lambda: queue.starts(task), 20, "the task to start", w.tail)
            pg_db.server.down()
            try:
                wait_until(lambda: "could not record" in w.output(), 15, "the deferral", w.tail)
            finally:
                pg_db.server.up()
            _settled(queue, workers, 40)
            row = queue.row(task)
            assert row.status == Status.PROCESSED
            assert len(queue.done(task)) == 1  # the second run's write
            assert len(queue.starts(task)) == 2
            check_invariants(queue, releases={task: 1})
            workers.stop_all_cleanly()
    finally:
        queue.dispose()


# -- 13. schema changes during a deploy -----------------------------------------------------------


def test_a_worker_whose_model_no_longer_matches_the_table_leaves_its_tasks(
    queue: Queue, workers: Workers
) -> None:
    ids = queue.add(3, action="ok")
    old = workers.start(model="tests.mismatch_tasks:MismatchTask")
    wait_until(lambda: "no longer matches" in old.output(), 20, "the mismatch", old.tail)
    time.sleep(1)
    rows = queue.rows()
    assert all(rows[t].status == Status.PENDING for t in ids), rows
    assert all(rows[t].alchq_failures == 0 for t in ids)
    assert old.output().count("no longer matches") == 1
    assert old.alive()
    new = workers.start()
    _settled(queue, workers)
    assert all(queue.row(t).status == Status.PROCESSED for t in ids)
    assert all(queue.done(t) == [new.pid] for t in ids)
    check_invariants(queue, releases=dict.fromkeys(ids, 1))
    workers.stop_all_cleanly()


# -- 14. secrets ----------------------------------------------------------------------------------


def test_no_statement_parameters_in_the_log(queue: Queue, workers: Workers) -> None:
    sentinel = "tok-SECRET-1234"
    (task,) = queue.add(action="flush_fails", payload=sentinel)
    w = workers.start(log_level="DEBUG")
    _settled(queue, workers)
    assert queue.row(task).status == Status.ERROR
    assert sentinel not in w.output(), w.output()
    assert sentinel not in (queue.row(task).alchq_error_message or "")
    workers.stop_all_cleanly()


def test_a_password_with_an_unencoded_at_sign_is_never_shown(
    pg_db: PgDatabase, tmp_path: Path
) -> None:
    password = "p@ss@w0rd"
    pg_db.server.psql(
        "DO $$ BEGIN CREATE ROLE carol LOGIN SUPERUSER PASSWORD 'p@ss@w0rd'; "
        "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
    )
    good = pg_db.url.replace("://postgres@", f"://carol:{password}@")
    bad_port = good.replace(f":{pg_db.server.port}/", f":{_free_port()}/")
    for url in (good, bad_port):
        done = run_alchq("run", "tests.fault_tasks:FaultTask", "--database-url", url, "--burst")
        out = done.stdout + done.stderr
        for fragment in ("p@ss", "ss@w0rd", "w0rd"):
            assert fragment not in out, out
    assert run_alchq(
        "run", "tests.fault_tasks:FaultTask", "--database-url", good, "--burst"
    ).returncode in (0, 1)


# -- 15. nonsense settings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variable, value",
    [
        ("ALCHQ_POLL_INTERVAL", "nan"),
        ("ALCHQ_POLL_INTERVAL", "inf"),
        ("ALCHQ_LEASE", "nan"),
        ("ALCHQ_HEARTBEAT_INTERVAL", "nan"),
        ("ALCHQ_GRACE_PERIOD", "-inf"),
        ("ALCHQ_MAX_LOST_CLAIMS", "1e9"),
    ],
)
def test_nonsense_settings_are_refused_in_one_line(
    tmp_path: Path, variable: str, value: str
) -> None:
    import os

    from tests.conftest import worker_env

    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    env = {**worker_env(), variable: value}
    done = run_alchq(
        "run", "tests.fault_tasks:FaultTask", "--database-url", url, "--burst", env=env
    )
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert variable in lines[0] or variable.removeprefix("ALCHQ_").lower() in lines[0], lines[0]
    assert os.path.exists(tmp_path)  # nothing else to check: refused before starting


# -- 16. one clear line ---------------------------------------------------------------------------


def _one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if "alchq: error:" in line]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in errors[0], errors[0]


def test_read_only_sqlite_url_and_not_a_database_are_one_line(queue: Queue, tmp_path: Path) -> None:
    if queue.dialect != "sqlite":
        pytest.skip("SQLite files")
    queue.add(action="ok")
    ro = f"sqlite:///file:{queue.engine.url.database}?mode=ro&uri=true"
    _one_line_error(
        run_alchq("run", "tests.fault_tasks:FaultTask", "--database-url", ro, "--burst"),
        "read-only",
    )
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database, just text\n" * 100)
    _one_line_error(
        run_alchq(
            "run", "tests.fault_tasks:FaultTask", "--database-url", f"sqlite:///{junk}", "--burst"
        ),
        "not a database",
    )


def test_a_revoked_privilege_is_one_line(queue: Queue) -> None:
    _pg_only(queue)
    queue.add(action="ok")
    with queue.engine.begin() as conn:
        conn.execute(
            text(
                "DO $$ BEGIN CREATE ROLE dave LOGIN PASSWORD 'dpw'; "
                "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
            )
        )
        conn.execute(text("GRANT SELECT, INSERT, DELETE ON ALL TABLES IN SCHEMA public TO dave"))
        conn.execute(text("GRANT CREATE ON SCHEMA public TO dave"))
    url = queue.url.replace("://postgres@", "://dave:dpw@")
    _one_line_error(
        run_alchq("run", "tests.fault_tasks:FaultTask", "--database-url", url, "--burst"),
        "fault_task",
    )


def test_a_read_only_database_is_said_and_waited_out(queue: Queue, workers: Workers) -> None:
    _pg_only(queue)
    name = queue.engine.url.database
    admin = create_engine(queue.engine.url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on'))
        w = workers.start()
        wait_until(lambda: "read-only" in w.output(), 20, "the read-only line", w.tail)
        assert w.alive()
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" RESET default_transaction_read_only'))
        queue.engine.dispose()
        (task,) = queue.add(action="ok")
        _settled(queue, workers, 60)
        assert queue.row(task).status == Status.PROCESSED
        _no_traceback(w)
        workers.stop_all_cleanly()
    finally:
        admin.dispose()


def test_a_time_limit_inside_a_query_is_one_line(queue: Queue, workers: Workers) -> None:
    _pg_only(queue)
    slow, after = queue.add_many([{"action": "pg_sleep"}, {"action": "ok"}])
    w = workers.start(env={"FAULT_TIME_LIMIT": "1"})
    _settled(queue, workers)
    assert queue.row(slow).status == Status.ERROR and queue.row(slow).alchq_error_type == TIMEOUT
    assert queue.row(after).status == Status.PROCESSED
    _no_traceback(w)
    workers.stop_all_cleanly()


# -- 18. hand-written times on SQLite -------------------------------------------------------------


def test_hand_written_times_are_compared_as_times(queue: Queue, workers: Workers) -> None:
    if queue.dialect != "sqlite":
        pytest.skip("SQLite stores times as text")
    with queue.engine.begin() as conn:
        conn.execute(
            text("INSERT INTO fault_task (action, run_at) VALUES ('ok', '2020-01-01T10:00:00')")
        )
        conn.execute(
            text("INSERT INTO fault_task (action, run_at) VALUES ('ok', '2020-01-01T10:00:00Z')")
        )
        conn.execute(text("INSERT INTO fault_task (action, run_at) VALUES ('ok', 'garbage')"))
        conn.execute(
            text(
                "INSERT INTO fault_task (action, status, alchq_lease_until) "
                "VALUES ('ok', 'PROCESSING', 'not a time')"
            )
        )
        ids = [r[0] for r in conn.execute(text("SELECT id FROM fault_task ORDER BY id"))]
    iso, zulu, garbage, lease = ids
    w = workers.start()
    _settled(queue, workers)
    rows = queue.rows()
    assert rows[iso].status == rows[zulu].status == Status.PROCESSED
    # Not stuck without a word: claimed, and reported as a row that cannot be loaded.
    assert rows[garbage].status == Status.ERROR and "garbage" in rows[garbage].alchq_error_message
    assert (
        rows[lease].status in (Status.PROCESSED, Status.ERROR)
        and rows[lease].alchq_lost_claims == 1
    )
    assert w.alive()
    workers.stop_all_cleanly()
