"""alchq.monitoring, progress, cancelling running tasks, the registry, events and metrics,
on SQLite and PostgreSQL, with real worker processes where a worker is involved."""

from __future__ import annotations

import logging
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text, update
from sqlalchemy.orm import Session

from alchq import CancelError, Status, TaskNotFoundError, TaskStateError, events, monitoring, worker
from alchq.metrics import register_queue_collector
from alchq.model import metadata, progress_table, task_table, workers_table
from tests.conftest import ROOT, alchq_command, worker_env
from tests.models_monitoring import MonCancel, MonProgress, MonQuick, MonTight
from tests.support import wait_until

MODELS = "tests.models_monitoring"


@pytest.fixture
def db(engine: Engine) -> Iterator[Engine]:
    metadata.create_all(engine)
    yield engine
    metadata.drop_all(engine)


class Workers:
    """Real ``alchq run`` processes, stopped at the end of the test."""

    def __init__(self, url: str, tmp: Path) -> None:
        self.url, self.tmp, self.procs = url, tmp, []  # type: ignore[var-annotated]

    def start(self, *models: str, **env: str) -> subprocess.Popen[str]:
        log = open(self.tmp / f"worker-{len(self.procs)}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            alchq_command("run", *(f"{MODELS}:{m}" for m in models), "--database-url", self.url),
            cwd=ROOT,
            env={**worker_env(), **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.procs.append((proc, log))
        return proc

    def log(self, index: int = 0) -> str:
        return (self.tmp / f"worker-{index}.log").read_text()

    def stop(self) -> None:
        for proc, log in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()


@pytest.fixture
def workers(db: Engine, db_url: str, tmp_path: Path) -> Iterator[Workers]:
    running = Workers(db_url, tmp_path)
    yield running
    running.stop()


def _status(engine: Engine, model: Any, id: int) -> str:
    with Session(engine) as s:
        return str(s.get(model, id).status)  # type: ignore[union-attr]


# -- the API on finished and waiting tasks ----------------------------------------------


def test_queue_stats_counts_times_errors(db: Engine) -> None:
    with Session(db) as s:
        s.add_all([MonQuick(fail=0) for _ in range(6)])
        s.add_all([MonQuick(fail=1) for _ in range(2)])
        s.add(MonQuick(run_at=timedelta(hours=1)))
        s.commit()
    assert worker.process_all(MonQuick, engine=db) == 8
    with Session(db) as s:
        s.add_all([MonQuick() for _ in range(3)])
        s.commit()
        stats = monitoring.queue_stats(s, MonQuick)
    assert stats.counts == {
        "PENDING": 4,
        "PROCESSING": 0,
        "PROCESSED": 6,
        "ERROR": 2,
        "CANCELLED": 0,
    }
    assert (stats.ready, stats.scheduled) == (3, 1)
    assert stats.oldest_ready_age is not None and 0 <= stats.oldest_ready_age < 60
    assert len(stats.throughput) == 60
    assert sum(m.processed for m in stats.throughput) == 6
    assert sum(m.failed for m in stats.throughput) == 2
    assert stats.run_time_mean is not None and stats.run_time_p95 is not None
    assert 0 <= stats.run_time_mean <= stats.run_time_p95 < 10
    assert [e.error_type for e in stats.recent_errors] == ["ValueError", "ValueError"]
    assert stats.recent_errors[0].message == "asked to fail"
    assert stats.running == []
    as_json = stats.as_dict()
    assert as_json["counts"]["ERROR"] == 2 and isinstance(as_json["now"], str)


def test_tasks_task_retry_delete_and_bulk(db: Engine) -> None:
    with Session(db) as s:
        s.add_all([MonQuick(fail=i % 2, secret=f"<script>{i}</script>") for i in range(10)])
        s.commit()
    worker.process_all(MonQuick, engine=db)
    with Session(db) as s:
        page = monitoring.tasks(s, MonQuick, status="ERROR", limit=3)
        assert page.total == 5 and len(page.items) == 3
        assert {t.status for t in page.items} == {"ERROR"}
        detail = monitoring.task(s, MonQuick, page.items[0].key)
        assert detail is not None and detail.columns["secret"].startswith("<script>")
        assert detail.traceback and "ValueError: asked to fail" in detail.traceback
        assert monitoring.task(s, MonQuick, "999") is None
        with pytest.raises(TaskNotFoundError, match="not a valid id"):
            monitoring.task(s, MonQuick, "abc")

        monitoring.retry(s, MonQuick, page.items[0].key)
        s.commit()
        assert monitoring.task(s, MonQuick, page.items[0].key).status == "PENDING"  # type: ignore[union-attr]
        processed = monitoring.tasks(s, MonQuick, status="PROCESSED").items[0].key
        with pytest.raises(TaskStateError, match="PROCESSED"):
            monitoring.retry(s, MonQuick, processed)
        with pytest.raises(TaskNotFoundError):
            monitoring.retry(s, MonQuick, "999")
        monitoring.delete(s, MonQuick, processed)
        s.commit()
        assert monitoring.task(s, MonQuick, processed) is None

        # Bulk by filter, in batches of 2: exactly the filtered rows change.
        assert monitoring.bulk(s, MonQuick, "retry", status="ERROR", batch_size=2) == 4
        counts = monitoring.queue_stats(s, MonQuick).counts
        assert counts["ERROR"] == 0 and counts["PENDING"] == 5 and counts["PROCESSED"] == 4
        assert monitoring.bulk(s, MonQuick, "cancel", status="PENDING", batch_size=2) == 5
        counts = monitoring.queue_stats(s, MonQuick).counts
        assert counts["CANCELLED"] == 5 and counts["PROCESSED"] == 4
        with pytest.raises(CancelError):
            monitoring.cancel(
                s, MonQuick, monitoring.tasks(s, MonQuick, status="PROCESSED").items[0].key
            )
        assert monitoring.bulk(s, MonQuick, "delete", status="CANCELLED") == 5
        assert monitoring.queue_stats(s, MonQuick).counts["CANCELLED"] == 0


# -- progress ---------------------------------------------------------------------------


@pytest.mark.parametrize("write", [0, 1], ids=["reads", "writes-its-row"])
def test_progress_is_seen_while_the_task_runs_and_kept_after(
    workers: Workers, db: Engine, db_url: str, tmp_path: Path, write: int
) -> None:
    with Session(db) as s:
        s.add(MonProgress(steps=3, write=write, folder=str(tmp_path)))
        s.commit()
    workers.start("MonProgress")
    sqlite_locked = write and db.dialect.name == "sqlite"
    for i in (1, 2):
        step = tmp_path / f"step-{i}"
        wait_until(step.exists, 30, f"step {i}", workers.log)
        if not sqlite_locked:
            # Another connection sees it while run() goes on, its writes uncommitted.
            def seen(i: int = i) -> Any:
                with Session(db) as s:
                    p = monitoring.progress(s, MonProgress, 1)
                    return p if p is not None and p.message == f"step {i} of 3" else None

            got = wait_until(seen, 10, f"progress of step {i}", workers.log)
            assert got.fraction == pytest.approx(i / 3)
            with Session(db) as s:
                (running,) = monitoring.queue_stats(s, MonProgress).running
                assert running.progress == pytest.approx(i / 3)
                assert running.message == f"step {i} of 3"
        (tmp_path / f"go-{i}").touch()
    (tmp_path / "go-3").touch()
    wait_until(lambda: _status(db, MonProgress, 1) == "PROCESSED", 30, "PROCESSED", workers.log)
    with Session(db) as s:
        kept = monitoring.progress(s, MonProgress, 1)
        task = s.get(MonProgress, 1)
        assert task is not None and (task.note is not None) == bool(write)
    assert kept is not None and kept.fraction == 1.0 and kept.message == "step 3 of 3"


def test_progress_in_a_tight_loop_is_written_about_once_a_second(
    workers: Workers, db: Engine
) -> None:
    if db.dialect.name != "postgresql":
        pytest.skip("counts the table's row writes with PostgreSQL's statistics")
    with Session(db) as s:
        s.add(MonTight(seconds=3))
        s.commit()
    workers.start("MonTight")
    wait_until(lambda: _status(db, MonTight, 1) == "PROCESSED", 30, "PROCESSED", workers.log)

    def writes() -> int:
        with db.connect() as conn:
            conn.execute(text("SELECT pg_stat_force_next_flush()"))
            return int(
                conn.execute(
                    text(
                        "SELECT n_tup_ins + n_tup_upd FROM pg_stat_user_tables "
                        "WHERE relname = 'alchq_progress'"
                    )
                ).scalar_one()
            )

    count = wait_until(writes, 10, "statistics")
    assert 2 <= count <= 8, f"{count} progress writes in 3 s of a tight loop"
    with Session(db) as s:
        p = monitoring.progress(s, MonTight, 1)
    assert p is not None and p.message == "done"


def test_a_fenced_workers_late_progress_write_is_rejected(
    workers: Workers, db: Engine, tmp_path: Path
) -> None:
    with Session(db) as s:
        s.add(MonProgress(steps=2, folder=str(tmp_path)))
        s.commit()
    proc = workers.start("MonProgress")
    wait_until(lambda: (tmp_path / "step-1").exists(), 30, "step 1", workers.log)

    def first() -> Any:
        with Session(db) as s:
            return monitoring.progress(s, MonProgress, 1)

    wait_until(first, 10, "first progress", workers.log)
    proc.send_signal(signal.SIGSTOP)
    try:
        # Another worker took the task over while this one was frozen.
        with db.begin() as conn:
            table = task_table(MonProgress)
            conn.execute(
                update(table)
                .where(table.c.id == 1)
                .values(alchq_worker="thief", alchq_attempts=table.c.alchq_attempts + 1)
            )
    finally:
        proc.send_signal(signal.SIGCONT)
    (tmp_path / "go-1").touch()
    (tmp_path / "go-2").touch()
    wait_until(
        lambda: "no longer holds the claim" in workers.log(),
        30,
        "the worker to find its claim gone",
        workers.log,
    )
    notes = progress_table(metadata)
    with db.connect() as conn:
        row = conn.execute(select(notes)).one()
    # Still the frozen worker's first value: its later writes were fenced off.
    assert row.message == "step 1 of 2" and row.attempt == 1
    with Session(db) as s:
        assert monitoring.progress(s, MonProgress, 1) is None  # not the current attempt's


# -- cancelling a running task ------------------------------------------------------------


def test_cancel_a_running_task_rolls_back_its_writes_and_ends_it_cancelled(
    workers: Workers, db: Engine, tmp_path: Path
) -> None:
    with Session(db) as s:
        s.add_all([MonCancel(folder=str(tmp_path)), MonQuick()])
        s.commit()
    workers.start("MonCancel", "MonQuick")
    wait_until(lambda: (tmp_path / "started-1").exists(), 30, "the task to start", workers.log)
    with Session(db) as s:
        if db.dialect.name == "sqlite":
            # The running task holds SQLite's file: the request waits for it, or says so.
            with pytest.raises(Exception, match="busy|locked"):
                monitoring.cancel(s, MonCancel, 1)
            return
        assert monitoring.cancel(s, MonCancel, 1) is Status.PROCESSING
        s.commit()
    wait_until(lambda: _status(db, MonCancel, 1) == "CANCELLED", 30, "CANCELLED", workers.log)
    with Session(db) as s:
        task = s.get(MonCancel, 1)
        assert task is not None and task.note is None  # run()'s write rolled back
        assert task.alchq_finished_at is not None
    assert not (tmp_path / "error-1").exists()  # error() is for failures only
    assert "MonCancel 1 was cancelled" in workers.log()
    # The worker carries on.
    wait_until(lambda: _status(db, MonQuick, 1) == "PROCESSED", 30, "the next task", workers.log)


# -- the worker registry ------------------------------------------------------------------


def test_registry_alive_gone_and_clean_stop(workers: Workers, db: Engine) -> None:
    fast = {"ALCHQ_HEARTBEAT_INTERVAL": "0.5", "ALCHQ_LEASE": "1.5"}
    killed = workers.start("MonQuick", **fast)
    stopped = workers.start("MonQuick", **fast)

    def listed() -> Any:
        with Session(db) as s:
            found = monitoring.workers(s, [MonQuick])
        return found if len(found) == 2 and all(w.alive for w in found) else None

    found = wait_until(listed, 30, "two live workers", workers.log)
    assert {w.models[0] for w in found} == {"MonQuick"}
    assert all(w.host and w.pid and w.version for w in found)

    killed_pid = killed.pid
    # The supervisor is killed; its worker process dies with it (Linux).
    killed.kill()
    killed.wait()

    def one_gone() -> Any:
        with Session(db) as s:
            found = monitoring.workers(s, [MonQuick])
        return found if any(not w.alive for w in found) else None

    found = wait_until(one_gone, 30, "the killed worker shown gone", workers.log)
    gone = [w for w in found if not w.alive]
    assert len(gone) == 1 and gone[0].id.split(":")[1] == str(killed_pid)

    stopped.terminate()
    stopped.wait(timeout=30)
    with Session(db) as s:
        ids = [w.id for w in monitoring.workers(s, [MonQuick])]
    assert all(i.split(":")[1] != str(stopped.pid) for i in ids)  # removed itself


def test_gone_workers_age_out(db: Engine) -> None:
    table = workers_table(metadata)
    with db.begin() as conn:
        conn.execute(
            table.insert().values(
                id="old:1:abc",
                host="old",
                pid=1,
                models="MonQuick",
                version="0",
                expires_at=datetime(2000, 1, 1, tzinfo=timezone.utc),
            )
        )
    with Session(db) as s:
        assert [w.alive for w in monitoring.workers(s, [MonQuick])] == [False]
    worker.process_all(MonQuick, engine=db)  # its rescue forgets workers gone for an hour
    with Session(db) as s:
        assert monitoring.workers(s, [MonQuick]) == []


# -- events and metrics -------------------------------------------------------------------


def test_events_and_structured_log_records(db: Engine, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[events.Event] = []

    def broken(event: events.Event) -> None:
        raise RuntimeError("a broken subscriber")

    events.subscribe(seen.append)
    events.subscribe(broken)
    try:
        with Session(db) as s:
            s.add_all([MonQuick(fail=0), MonQuick(fail=1)])
            s.commit()
        with caplog.at_level(logging.INFO, logger="alchq"):
            assert worker.process_all(MonQuick, engine=db) == 2
    finally:
        events.unsubscribe(seen.append)
        events.unsubscribe(broken)
    kinds = [(e.kind, e.task_id, e.outcome) for e in seen if e.kind.startswith("task")]
    assert kinds == [
        ("task_started", "1", None),
        ("task_finished", "1", "PROCESSED"),
        ("task_started", "2", None),
        ("task_finished", "2", "ERROR"),
    ]
    finished = [e for e in seen if e.kind == "task_finished"]
    assert all(e.duration is not None and e.duration >= 0 for e in finished)
    assert finished[1].error_type == "ValueError" and finished[1].model == "MonQuick"
    assert [e.kind for e in seen if e.kind.startswith("worker")] == [
        "worker_started",
        "worker_stopped",
    ]
    assert sum("event subscriber" in r.message for r in caplog.records) == 1  # said once
    ends = [r for r in caplog.records if getattr(r, "alchq_outcome", None)]
    assert [(r.alchq_model, r.alchq_task_id, r.alchq_outcome) for r in ends] == [  # type: ignore[attr-defined]
        ("MonQuick", "1", "PROCESSED"),
        ("MonQuick", "2", "ERROR"),
    ]
    assert all(isinstance(r.alchq_duration, float) for r in ends)  # type: ignore[attr-defined]
    assert all("asked to fail" not in str(getattr(r, "secret", "")) for r in ends)


def test_queue_collector_exposes_the_queue(db: Engine) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    with Session(db) as s:
        s.add_all([MonQuick(), MonQuick(), MonQuick(run_at=timedelta(hours=1))])
        s.commit()
    registry = CollectorRegistry()
    register_queue_collector([MonQuick], lambda: Session(db), registry)
    exposed = generate_latest(registry).decode()
    assert 'alchq_tasks{model="MonQuick",status="PENDING"} 3.0' in exposed
    assert 'alchq_tasks_ready{model="MonQuick"} 2.0' in exposed
    assert 'alchq_tasks_scheduled{model="MonQuick"} 1.0' in exposed
    assert "alchq_workers_alive 0.0" in exposed


def test_worker_serves_metrics_on_its_port(workers: Workers, db: Engine) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with Session(db) as s:
        s.add_all([MonQuick(fail=0), MonQuick(fail=0), MonQuick(fail=1)])
        s.commit()
    proc = subprocess.Popen(
        alchq_command(
            "run",
            f"{MODELS}:MonQuick",
            "--database-url",
            workers.url,
            "--metrics-port",
            str(port),
            "--concurrency",
            "2",
        ),
        cwd=ROOT,
        env=worker_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def scrape() -> str | None:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
            except OSError:
                return None
            page: str = body.read().decode()
            # Every outcome counted: the worker processes' counters arrive one by one.
            done = 'alchq_tasks_failed_total{model="MonQuick"} 1.0' in page
            done = done and 'alchq_tasks_processed_total{model="MonQuick"} 2.0' in page
            return page if done and "alchq_workers_alive 2.0" in page else None

        page = wait_until(scrape, 30, "metrics with the three outcomes and both workers")
        assert page is not None
        assert 'alchq_tasks_processed_total{model="MonQuick"} 2.0' in page
        assert 'alchq_tasks{model="MonQuick",status="PROCESSED"} 2.0' in page
        assert 'alchq_task_run_seconds_count{model="MonQuick",outcome="PROCESSED"} 2.0' in page
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_prune_deletes_the_progress_of_pruned_tasks_only(db: Engine) -> None:
    import alchq

    with Session(db) as s:
        s.add_all([MonProgress(steps=2), MonProgress(steps=2)])
        s.commit()
    assert worker.process_all(MonProgress, engine=db) == 2  # an in-process worker reports too
    notes = progress_table(metadata)
    with db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(notes)).scalar_one() == 2
    with db.begin() as conn:  # task 2 is kept (pending again); its progress with it
        table = task_table(MonProgress)
        conn.execute(update(table).where(table.c.id == 2).values(status="PENDING"))
    alchq.prune(MonProgress, engine=db, processed=0, error=None, cancelled=None)
    with db.connect() as conn:
        left = conn.execute(select(notes.c.task_key)).scalars().all()
    with Session(db) as s:
        assert s.get(MonProgress, 1) is None
    assert left == ["2"]


def test_task_models_are_one_per_table() -> None:
    from tests.models_inherit import InhBigExport, InhExport, InhTask

    found = monitoring.task_models()
    assert InhTask in found  # its counts hold its subclasses' rows
    assert InhExport not in found and InhBigExport not in found
    assert MonQuick in found and MonProgress in found


def test_actions_on_lost_owed_and_reused_tasks(db: Engine) -> None:
    table = task_table(MonQuick)
    notes = progress_table(metadata)
    with Session(db) as s:
        s.add_all([MonQuick() for _ in range(4)])
        s.commit()
    with db.begin() as conn:
        # 1: running under a worker that is gone (no registry row), its lease over.
        conn.execute(
            update(table)
            .where(table.c.id == 1)
            .values(
                status="PROCESSING",
                alchq_worker="ghost:1:x",
                alchq_attempts=1,
                alchq_lease_until=datetime(2000, 1, 1, tzinfo=timezone.utc),
            )
        )
        # 2: ERROR whose error() a worker is still calling (its lease runs).
        conn.execute(
            update(table)
            .where(table.c.id == 2)
            .values(
                status="ERROR",
                alchq_lease_until=datetime(2100, 1, 1, tzinfo=timezone.utc),
            )
        )
        # 3: a new task whose key an old task's progress row still holds.
        conn.execute(
            update(table)
            .where(table.c.id == 3)
            .values(
                status="PROCESSING",
                alchq_worker="w",
                alchq_attempts=1,
                alchq_started_at=datetime(2030, 1, 1, tzinfo=timezone.utc),
            )
        )
        conn.execute(
            notes.insert().values(
                task_table=table.name,
                task_key="3",
                attempt=1,
                fraction=1.0,
                message="the old task's",
                updated_at=datetime(2029, 1, 1, tzinfo=timezone.utc),
            )
        )
    with Session(db) as s:
        assert monitoring.cancel(s, MonQuick, 1) is Status.CANCELLED  # nobody would see a request
        with pytest.raises(TaskStateError):
            monitoring.retry(s, MonQuick, 2)
        with pytest.raises(TaskStateError):
            monitoring.delete(s, MonQuick, 2)
        assert monitoring.progress(s, MonQuick, 3) is None
        assert monitoring.queue_stats(s, MonQuick).running[0].progress is None
        # Bulk actions touch only the tasks they apply to.
        assert monitoring.bulk(s, MonQuick, "retry", status="PENDING") == 0
        assert monitoring.bulk(s, MonQuick, "retry") == 1  # task 1 (CANCELLED); 2's error() runs
        s.commit()
        counts = monitoring.queue_stats(s, MonQuick).counts
    assert counts == {"PENDING": 2, "PROCESSING": 1, "PROCESSED": 0, "ERROR": 1, "CANCELLED": 0}
