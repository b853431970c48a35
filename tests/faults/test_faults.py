"""Fault scenarios of issue 3, with real worker processes, signals and database faults.

Each scenario ends with :func:`check_invariants`: nothing PROCESSING, every
outcome committed once, every extra start explained by a lost worker.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from alchq import Status
from alchq.model import MAX_COUNTER
from tests.fault_tasks import UNLOADABLE, fault_start
from tests.faults.conftest import (
    GRACE_PERIOD,
    LEASE,
    RESCUE_INTERVAL,
    RESCUE_WAIT,
    MariaDBDatabase,
    PgDatabase,
    Queue,
    WorkerProc,
    Workers,
    check_invariants,
    logged_releases,
    pg_row_lock_free,
    random_sigkills,
    sqlite_write_lock_free,
)
from tests.support import check_refused, wait_until

LOST = "alchq.exceptions.WorkerLostError"
TIMEOUT = "alchq.exceptions.TaskTimeoutError"
FENCED = "no longer holds the claim"


def _settled(queue: Queue, workers: Workers, timeout: float, what: str = "every task done") -> None:
    wait_until(
        queue.settled,
        timeout,
        interval=0.2,
        what=what,
        describe=lambda: f"{queue.describe()}\n{workers.describe()}",
    )


def _error_called(queue: Queue, *task_ids: int, timeout: float = 10) -> None:
    """Wait for error() to have committed: it runs just after ERROR is committed."""
    wait_until(
        lambda: all(queue.row(t).errors == 1 for t in task_ids),
        timeout,
        what=f"error() of {task_ids} to commit",
        describe=queue.describe,
    )


def _started(queue: Queue, task_id: int, worker: WorkerProc, timeout: float = 20) -> None:
    """Wait until ``worker`` is inside ``task_id``'s run()."""
    wait_until(
        lambda: worker.pid in queue.starts(task_id),
        timeout,
        interval=0.02,
        what=f"task {task_id} started by {worker.name}",
        describe=worker.tail,
    )


# -- 1. workers SIGKILLed at random ---------------------------------------------------------


def test_random_sigkills(queue: Queue, workers: Workers) -> None:
    """2,000 tasks over 4 workers; every 1-2 s a random worker is SIGKILLed and replaced."""
    random_sigkills(queue, workers, tasks=2000, n_workers=4, max_kills=8, timeout=200)


# -- 2. a worker frozen past its lease ---------------------------------------------------------


def _freeze_clear_of_locks(
    queue: Queue, workers: Workers, worker: WorkerProc, task_id: int
) -> None:
    """SIGSTOP ``worker`` at a moment it holds no lock the others need.

    A process frozen inside a write (its heartbeat's UPDATE, say) keeps
    SQLite's write lock, or on PostgreSQL the task row's lock, until it is
    resumed; the scenario is about a frozen worker, not a frozen lock.
    """
    for _ in range(50):
        workers.freeze(worker)
        if queue.dialect == "sqlite":
            free = sqlite_write_lock_free(queue.engine)
        else:
            free = pg_row_lock_free(queue.engine, task_id)
        if free:
            return
        workers.thaw(worker)
        time.sleep(0.05)
    raise AssertionError("could not freeze the worker clear of its locks")


@pytest.mark.parametrize("action", ["ok", "raise"])
def test_frozen_worker_is_fenced(queue: Queue, workers: Workers, action: str) -> None:
    """Frozen past its lease, then resumed: its outcome and run()'s writes are refused."""
    (task,) = queue.add(action=action, sleep=2000)
    first = workers.start()
    _started(queue, task, first)
    _freeze_clear_of_locks(queue, workers, first, task)
    second = workers.start()
    # The lease runs out; the second worker rescues the task and runs it itself.
    wait_until(
        lambda: second.pid in queue.starts(task),
        RESCUE_WAIT,
        what="the second worker to take the task over",
        describe=workers.describe,
    )
    row = queue.row(task)
    assert row.alchq_lost_claims == 1 and row.alchq_attempts == 2
    workers.thaw(first)
    wait_until(
        lambda: FENCED in first.output(),
        10,
        what="the first worker to find its claim gone",
        describe=workers.describe,
    )
    _settled(queue, workers, 10)
    if action != "ok":
        _error_called(queue, task)
    row = queue.row(task)
    assert second.owns(row.alchq_worker)
    assert queue.starts(task) == [first.pid, second.pid]
    if action == "ok":
        assert row.status == Status.PROCESSED
        assert queue.done(task) == [second.pid]  # the first one's insert was rolled back
        assert row.errors == 0
    else:
        assert row.status == Status.ERROR and row.alchq_error_type == "ValueError"
        assert row.errors == 1  # the second worker's error(); a fenced worker calls none
    check_invariants(queue, describe=workers.describe)
    assert first.alive() and second.alive()
    workers.stop_all_cleanly()
    assert first.output().count(FENCED) == 1, first.output()
    assert FENCED not in second.output()


def test_slow_live_task_is_never_taken_over(queue: Queue, workers: Workers) -> None:
    """A task busy in Python for longer than the lease keeps its claim: the heartbeat renews it."""
    (task,) = queue.add(action="spin", sleep=int(LEASE * 1000 + 1500))
    first = workers.start()
    _started(queue, task, first)
    second = workers.start()  # idle, looking for expired leases every second
    _settled(queue, workers, LEASE + 15)
    row = queue.row(task)
    assert row.status == Status.PROCESSED
    assert row.alchq_attempts == 1 and row.alchq_lost_claims == 0
    assert queue.starts(task) == queue.done(task) == [first.pid]
    check_invariants(queue)
    workers.stop_all_cleanly()
    assert "lost" not in second.output()


# -- 3. signals -------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_finishes_the_task(queue: Queue, workers: Workers, sig: signal.Signals) -> None:
    (task,) = queue.add(action="ok", sleep=1000)
    w = workers.start()
    _started(queue, task, w)
    w.send(sig)
    assert w.wait(GRACE_PERIOD + 10) == 0, w.output()
    row = queue.row(task)
    assert row.status == Status.PROCESSED and row.alchq_attempts == 1
    assert queue.done(task) == [w.pid]
    check_invariants(queue)


def _released_then_done(queue: Queue, workers: Workers, task: int) -> None:
    """The released task is PENDING as it was claimed; a new worker then runs it once."""
    row = queue.row(task)
    assert row.status == Status.PENDING
    assert row.alchq_attempts == 1 and row.alchq_lost_claims == 0
    assert row.alchq_worker is None and row.alchq_lease_until is None
    assert queue.done(task) == []
    assert logged_releases(workers.output())[task] == 1
    check_invariants(queue)
    with queue.engine.begin() as conn:  # no need to wait 10 s again
        conn.execute(text("UPDATE fault_task SET sleep = 0 WHERE id = :id"), {"id": task})
    again = workers.start("--burst")
    assert again.wait(30) == 0, again.output()
    row = queue.row(task)
    assert row.status == Status.PROCESSED and row.alchq_attempts == 2
    check_invariants(queue, releases={task: 1})


def test_second_sigterm_releases_the_task(queue: Queue, workers: Workers) -> None:
    (task,) = queue.add(action="ok", sleep=10_000)
    w = workers.start()
    _started(queue, task, w)
    workers.term(w)
    wait_until(lambda: "received: finishing" in w.output(), 5, describe=w.tail)
    workers.term(w)
    second = time.monotonic()
    rc = w.wait(10)
    took = time.monotonic() - second
    assert rc != 0, w.output()
    assert took < 2.5, f"exited {took:.2f}s after the second SIGTERM"
    _released_then_done(queue, workers, task)


def test_second_sigterm_stops_an_uninterruptible_task(queue: Queue, workers: Workers) -> None:
    """A task that swallows the interrupt: the worker exits anyway, the task back to PENDING."""
    (task,) = queue.add(action="hang_hard")
    w = workers.start()
    _started(queue, task, w)
    workers.term(w)
    wait_until(lambda: "received: finishing" in w.output(), 5, describe=w.tail)
    workers.term(w)
    second = time.monotonic()
    rc = w.wait(10)
    took = time.monotonic() - second
    assert rc != 0, w.output()
    assert took < 2.5, f"exited {took:.2f}s after the second SIGTERM"
    with queue.engine.begin() as conn:  # the next run must not hang
        conn.execute(text("UPDATE fault_task SET action = 'ok' WHERE id = :id"), {"id": task})
    _released_then_done(queue, workers, task)


def test_grace_period_expiry_releases_the_task(queue: Queue, workers: Workers) -> None:
    (task,) = queue.add(action="ok", sleep=10_000)
    w = workers.start()
    _started(queue, task, w)
    workers.term(w)
    signalled = time.monotonic()
    rc = w.wait(GRACE_PERIOD + 10)
    took = time.monotonic() - signalled
    assert rc != 0, w.output()
    assert GRACE_PERIOD - 0.2 < took < GRACE_PERIOD + 2.5, f"exited after {took:.2f}s"
    _released_then_done(queue, workers, task)


# -- 4. database restarted, connections terminated ----------------------------------------------


def test_database_restart_and_terminated_connections(pg_db: PgDatabase, tmp_path: Path) -> None:
    queue = Queue(pg_db.url)
    try:
        with Workers(pg_db.url, tmp_path / "workers") as workers:
            queue.add(400, action="ok", sleep=20)
            pair = [workers.start(), workers.start()]

            def processed() -> int:
                return queue.counts().get("PROCESSED", 0)

            wait_until(lambda: processed() >= 60, 60, what="60 done", describe=workers.describe)
            pg_db.server.restart("immediate")
            before = processed()
            wait_until(
                lambda: processed() >= before + 60,
                60,
                what="progress after the restart",
                describe=workers.describe,
            )
            assert processed() < 400, "too fast: the terminations would hit idle workers"
            assert pg_db.terminate_backends() >= 2
            _settled(queue, workers, 90)
            assert all(w.alive() for w in pair), workers.describe()
            output = workers.output()
            counts = check_invariants(
                queue, releases=logged_releases(output), describe=workers.describe
            )
            assert counts == {"PROCESSED": 400}
            workers.stop_all_cleanly()
            reruns = {t: n for t, n in queue.per_task(fault_start).items() if n > 1}
            print(f"released by a worker: {dict(logged_releases(output))}; started again: {reruns}")
            assert "database unavailable" in output or "database is away" in output, output
    finally:
        queue.dispose()


@pytest.mark.parametrize("how", ["kill", "shutdown"])
def test_mariadb_server_restart(mariadb_db: MariaDBDatabase, tmp_path: Path, how: str) -> None:
    """The MariaDB server dies (kill -9) or shuts down (mariadb-admin shutdown) under two
    busy workers and comes back on the same port: they wait for it and go on, no task
    lost, none finished twice."""
    queue = Queue(mariadb_db.url)
    try:
        with Workers(mariadb_db.url, tmp_path / "workers") as workers:
            queue.add(300, action="ok", sleep=20)
            pair = [workers.start(), workers.start()]

            def processed() -> int:
                return queue.counts().get("PROCESSED", 0)

            wait_until(lambda: processed() >= 60, 60, what="60 done", describe=workers.describe)
            mariadb_db.server.restart(how, down_for=2)
            before = processed()
            wait_until(
                lambda: processed() >= before + 60,
                60,
                what="progress after the restart",
                describe=workers.describe,
            )
            _settled(queue, workers, 90)
            assert all(w.alive() for w in pair), workers.describe()
            output = workers.output()
            counts = check_invariants(
                queue, releases=logged_releases(output), describe=workers.describe
            )
            assert counts == {"PROCESSED": 300}
            workers.stop_all_cleanly()
            assert "database unavailable" in output or "database is away" in output, output
    finally:
        queue.dispose()


def test_read_only_window(pg_db: PgDatabase, tmp_path: Path) -> None:
    """The server turns read-only for a while (as in a failover): workers wait, then go on."""
    server = pg_db.server
    queue = Queue(pg_db.url)
    try:
        with Workers(pg_db.url, tmp_path / "workers") as workers:
            queue.add(300, action="ok", sleep=10)
            pair = [workers.start(), workers.start()]
            wait_until(
                lambda: queue.counts().get("PROCESSED", 0) >= 30, 60, describe=workers.describe
            )
            server.psql("ALTER SYSTEM SET default_transaction_read_only = on")
            server.psql("SELECT pg_reload_conf()")
            try:
                wait_until(
                    lambda: all("read-only" in w.output() for w in pair),
                    20,
                    what="both workers to meet the read-only server",
                    describe=workers.describe,
                )
                time.sleep(1)  # the window stays open a little longer: tasks in hand meet it
            finally:
                server.psql("ALTER SYSTEM RESET default_transaction_read_only")
                server.psql("SELECT pg_reload_conf()")
            _settled(queue, workers, 60)
            assert all(w.alive() for w in pair), workers.describe()
            output = workers.output()
            counts = check_invariants(
                queue, releases=logged_releases(output), describe=workers.describe
            )
            assert counts == {"PROCESSED": 300}
            workers.stop_all_cleanly()
    finally:
        queue.dispose()


def _outage_at_the_end_of_a_run(
    pg_db: PgDatabase, log_dir: Path, action: str = "quiet", hold: float = 0
) -> str:
    """Stop the server while a task runs and keep it down until its outcome is due.

    Checks that the outcome is written once the server is back, without a second
    run; returns the worker's output. ``action`` is ``quiet`` (run() writes
    nothing to the database) or ``own_connection`` (run() commits its start on
    a connection of its own, and writes nothing through its session). The
    server stays down ``hold`` more seconds once the outcome is waiting.
    """
    queue = Queue(pg_db.url)
    try:
        with Workers(pg_db.url, log_dir) as workers:
            (task,) = queue.add(action=action, sleep=1500)
            w = workers.start()
            quiet = workers.quiet_dir / f"{task}.starts"

            def starts() -> list[int]:
                if action == "quiet":
                    return [int(p) for p in quiet.read_text().split()] if quiet.exists() else []
                return queue.starts(task)

            wait_until(starts, 20, what="the task to start", describe=w.tail)
            pg_db.server.down()
            try:
                wait_until(
                    lambda: "could not record PROCESSED" in w.output(),
                    10,
                    what="the outcome to be deferred",
                    describe=w.tail,
                )
                time.sleep(hold)  # the outage's length, not a synchronization
            finally:
                pg_db.server.up()
            _settled(queue, workers, 30)
            row = queue.row(task)
            assert row.status == Status.PROCESSED, w.output()
            assert starts() == [w.pid], w.output()
            assert row.alchq_attempts == 1 and row.alchq_lost_claims == 0
            assert "recorded once the database was back" in w.output()
            assert w.alive()
            check_invariants(queue, quiet_dir=workers.quiet_dir)
            workers.stop_all_cleanly()
            return w.output()
    finally:
        queue.dispose()


def test_outcome_written_once_the_database_is_back(pg_db: PgDatabase, tmp_path: Path) -> None:
    """A task that finished while the server was down is recorded later, not run again.

    The server stays down for four heartbeat intervals more: one warning about the
    failing heartbeat, not one each time.
    """
    output = _outage_at_the_end_of_a_run(pg_db, tmp_path / "workers", hold=2)
    assert output.count("heartbeat failed") <= 1, output


def test_outcome_written_once_the_database_is_back_after_own_commits(
    pg_db: PgDatabase, tmp_path: Path
) -> None:
    """Same, for a run that committed writes on a connection of its own (not its session's)."""
    _outage_at_the_end_of_a_run(pg_db, tmp_path / "workers", action="own_connection")


# -- 5. abnormal task endings --------------------------------------------------------------------


ABNORMAL = {
    "sys_exit": "SystemExit",
    "keyboard_interrupt": "KeyboardInterrupt",
    "raise": "ValueError",
    "bad_error": "ValueError",
}


def test_abnormal_endings(queue: Queue, workers: Workers) -> None:
    """sys.exit, KeyboardInterrupt, exceptions, an error() that raises: ERROR, worker goes on."""
    plan = [action for a in ABNORMAL for action in (a, "ok")]
    ids = queue.add_many([{"action": a} for a in plan])
    w = workers.start()
    _settled(queue, workers, 30)
    _error_called(
        queue, *(t for t, a in zip(ids, plan, strict=True) if a not in ("ok", "bad_error"))
    )
    rows = queue.rows()
    for task, action in zip(ids, plan, strict=True):
        row = rows[task]
        assert queue.starts(task) == [w.pid], action
        if action == "ok":
            assert row.status == Status.PROCESSED, action
            continue
        assert row.status == Status.ERROR, action
        assert row.alchq_error_type == ABNORMAL[action]
        assert row.alchq_attempts == 1
        assert row.alchq_traceback
        # error() ran once; a raising error()'s own changes are rolled back.
        assert row.errors == (0 if action == "bad_error" else 1), action
    assert w.output().count("error() raised RuntimeError: error() failed too") == 1
    assert w.alive()
    check_invariants(queue)
    workers.stop_all_cleanly()


def test_os_exit_is_a_lost_claim(queue: Queue, workers: Workers) -> None:
    """os._exit() in run(): a lost claim (its supervisor starts a new worker process,
    which takes it over at once); lost three times, WorkerLostError."""
    once, always = queue.add_many([{"action": "os_exit_once"}, {"action": "os_exit"}])
    others = queue.add(3, action="ok")
    w = workers.start()
    _settled(queue, workers, 60)
    _error_called(queue, always)
    deaths = re.findall(r"died \(exit status 9\); starting a new one", w.output())
    rows = queue.rows()
    assert rows[once].status == Status.PROCESSED
    assert rows[once].alchq_lost_claims == 1 and rows[once].alchq_attempts == 2
    assert len(queue.starts(once)) == 2
    assert rows[always].status == Status.ERROR
    assert rows[always].alchq_error_type == LOST
    assert rows[always].alchq_lost_claims == 3
    assert len(queue.starts(always)) == 3
    assert rows[always].errors == 1
    assert all(rows[t].status == Status.PROCESSED for t in others)
    assert len(deaths) == 4, w.output()
    assert w.alive()
    check_invariants(queue, describe=workers.describe)
    workers.stop_all_cleanly()


def test_time_limits(queue: Queue, workers: Workers) -> None:
    """A hanging task ends TaskTimeoutError; an uninterruptible one gets its process replaced."""
    hang, after_hang, hard, after_hard = queue.add_many(
        [{"action": "hang"}, {"action": "ok"}, {"action": "hang_hard"}, {"action": "ok"}]
    )
    w = workers.start(env={"FAULT_TIME_LIMIT": "2"})
    _settled(queue, workers, 40)
    _error_called(queue, hang, hard)
    rows = queue.rows()
    for task in (hang, hard):
        assert rows[task].status == Status.ERROR
        assert rows[task].alchq_error_type == TIMEOUT
        assert rows[task].errors == 1
        assert queue.starts(task) == [w.pid]
    assert "replaced" in rows[hard].alchq_error_message
    for task in (after_hang, after_hard):
        assert rows[task].status == Status.PROCESSED
        assert queue.done(task) == [w.pid]  # the same process, replaced in place
    assert w.alive()
    assert w.output().count("serving FaultTask") == 2  # started again by exec
    check_invariants(queue)
    # Known open problem (see the closing note of the reliability issue): once, on
    # PostgreSQL, a worker replaced by exec did not exit within 20 s of SIGTERM.
    # Not diagnosed yet; this scenario is about time limits, so stop it by force then.
    try:
        workers.stop_all(timeout=20)
    except subprocess.TimeoutExpired:
        w.send(signal.SIGKILL)
        w.wait(10)


# -- 6. bad rows ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "columns, values",
    [
        ("status", "'BOGUS'"),
        ("status", "NULL"),
        ("alchq_attempts", "-1"),
        ("alchq_lost_claims", "-1"),
        # The column's maximum: the claim's "+ 1" would overflow (it once stopped workers).
        ("alchq_attempts", str(2**31 - 1)),
        ("alchq_lost_claims", str(2**31 - 1)),
    ],
)
def test_bad_rows_are_rejected(queue: Queue, columns: str, values: str) -> None:
    with pytest.raises(check_refused(queue.engine)):
        with queue.engine.begin() as conn:
            conn.execute(
                text(f"INSERT INTO fault_task (action, {columns}) VALUES ('ok', {values})")
            )
    assert queue.counts() == {}


def test_row_that_cannot_load_ends_in_error(queue: Queue, workers: Workers) -> None:
    first, bad, last = queue.add_many(
        [{"action": "ok"}, {"action": "ok", "payload": UNLOADABLE}, {"action": "ok"}]
    )
    w = workers.start()
    _settled(queue, workers, 20)
    rows = queue.rows()
    assert rows[first].status == rows[last].status == Status.PROCESSED
    assert rows[bad].status == Status.ERROR
    assert rows[bad].alchq_error_type == "ValueError"
    assert "cannot be loaded" in rows[bad].alchq_error_message
    assert queue.starts(bad) == []
    assert w.alive()
    check_invariants(queue)
    workers.stop_all_cleanly()


def test_garbage_timestamp(queue: Queue, workers: Workers) -> None:
    """SQLite stores any text in a timestamp column: the row ends in ERROR, the rest runs."""
    insert = "INSERT INTO fault_task (action, time_created) VALUES ('ok', 'garbage')"
    if queue.dialect != "sqlite":
        with pytest.raises(Exception, match="garbage"):  # DataError: a timestamptz check
            with queue.engine.begin() as conn:
                conn.execute(text(insert))
        return
    (first,) = queue.add(action="ok")
    with queue.engine.begin() as conn:
        conn.execute(text(insert))
        (bad,) = conn.execute(text("SELECT max(id) FROM fault_task")).one()
    (last,) = queue.add(action="ok")
    w = workers.start()
    _settled(queue, workers, 20)
    rows = queue.rows()
    assert rows[first].status == rows[last].status == Status.PROCESSED
    assert rows[bad].status == Status.ERROR
    assert "garbage" in rows[bad].alchq_error_message
    assert w.alive()
    check_invariants(queue)
    workers.stop_all_cleanly()


def test_hand_written_processing_row_is_rescued(queue: Queue, workers: Workers) -> None:
    """A PROCESSING row with no owner and no lease goes back to PENDING and runs once."""
    with queue.engine.begin() as conn:
        conn.execute(text("INSERT INTO fault_task (action, status) VALUES ('ok', 'PROCESSING')"))
    (after,) = queue.add(action="ok")
    w = workers.start()
    _settled(queue, workers, 20)
    rows = queue.rows()
    assert all(r.status == Status.PROCESSED for r in rows.values())
    assert [r.alchq_lost_claims for r in rows.values()] == [1, 0]
    assert queue.done(after) == [w.pid]
    check_invariants(queue)
    workers.stop_all_cleanly()


def _insert_raw(queue: Queue, columns: str, values: str) -> int:
    with queue.engine.begin() as conn:
        conn.execute(text(f"INSERT INTO fault_task (action, {columns}) VALUES ('ok', {values})"))
        (task,) = conn.execute(text("SELECT max(id) FROM fault_task")).one()
    return int(task)


def test_counter_at_its_bound_does_not_stop_the_queue(queue: Queue, workers: Workers) -> None:
    """A PENDING row with its attempts counter at the bound: not run, one warning; the rest runs."""
    (first,) = queue.add(action="ok")
    bad = _insert_raw(queue, "alchq_attempts", str(MAX_COUNTER))
    (last,) = queue.add(action="ok")
    w = workers.start()

    def last_done() -> bool:
        assert w.alive(), w.output()
        return bool(queue.row(last).status == Status.PROCESSED)

    wait_until(last_done, 20, what="the task after the bad row", describe=w.tail)
    time.sleep(1)  # five more polls, any of which might warn again
    rows = queue.rows()
    assert rows[first].status == Status.PROCESSED
    assert rows[bad].status in (Status.PENDING, Status.ERROR)
    assert queue.starts(bad) == []
    check_invariants(queue)
    workers.stop_all_cleanly()
    warnings = [
        line
        for line in w.output().splitlines()
        if "WARNING" in line and re.search(rf"\b{bad}\b", line)
    ]
    assert len(warnings) == 1, w.output()


@pytest.mark.parametrize("counter", ["alchq_attempts", "alchq_lost_claims"])
def test_processing_row_at_the_counter_bound_is_rescued(
    queue: Queue, workers: Workers, counter: str
) -> None:
    bad = _insert_raw(queue, f"status, {counter}", f"'PROCESSING', {MAX_COUNTER}")
    w = workers.start()  # a worker looks for expired leases as soon as it starts
    wait_until(
        lambda: queue.row(bad).status != Status.PROCESSING,
        5 + RESCUE_INTERVAL,
        what="the lost claim to be rescued",
        describe=w.tail,
    )
    assert w.alive()
    workers.stop_all_cleanly()


# -- 7. no secrets in the logs -----------------------------------------------------------------


def test_no_password_in_output(pg_db: PgDatabase, tmp_path: Path) -> None:
    password = "s3cret"
    sentinel = "column-value-sentinel"
    pg_db.server.psql(
        "DO $$ BEGIN CREATE ROLE bob LOGIN SUPERUSER PASSWORD 's3cret'; "
        "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
    )
    url = pg_db.url.replace("://postgres@", f"://bob:{password}@")
    assert password in url
    queue = Queue(url)
    try:
        with Workers(url, tmp_path / "workers") as workers:
            queue.add_many(
                [{"action": "raise", "payload": sentinel}]
                + [{"action": "ok", "sleep": 20, "payload": sentinel}] * 150
            )
            workers.start(log_level="INFO")
            workers.start(log_level="DEBUG")
            wait_until(
                lambda: queue.counts().get("PROCESSED", 0) >= 20, 60, describe=workers.describe
            )
            pg_db.server.restart("immediate")
            _settled(queue, workers, 60)
            pair = workers.alive()
            # The idle workers notice it at their next poll or heartbeat (whichever
            # uses the pool's dead connection first), and log it.
            noticed = "terminating connection due to administrator command"
            seen = {w.name: w.output().count(noticed) for w in pair}
            pg_db.terminate_backends()
            wait_until(
                lambda: all(w.output().count(noticed) > seen[w.name] for w in pair),
                20,
                describe=workers.describe,
            )
            workers.stop_all_cleanly()
            # Unreachable from the start: the error names the URL, masked.
            dead = url.replace(f":{pg_db.server.port}/", f":{_free_port()}/")
            unreachable = workers.start(url=dead)
            wait_until(
                lambda: not unreachable.alive() or "database" in unreachable.output(),
                30,
                what="the unreachable database to be reported",
            )
            workers.stop_all()
            output = workers.output()
    finally:
        queue.dispose()
    # A worker that never reached its database gives up, naming the URL masked (if it
    # waited instead, it was stopped by SIGTERM above and exited 0).
    assert "***" in unreachable.output() or unreachable.proc.returncode == 0
    assert password not in output
    assert sentinel not in output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
