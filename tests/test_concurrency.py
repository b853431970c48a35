"""Several ``alchq run`` processes share one queue: every task runs exactly once.

Counted in the database: CountTask.run() inserts into ``run_log`` in the same
transaction that records PROCESSED, so a task run twice (or lost) shows up as
a wrong row count.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, insert, select

from alchq import Status, metadata
from tests.conftest import ROOT, alchq_command, worker_env
from tests.tasks import CountTask, run_log

TASKS = 2_000
WORKERS = 4
TIMEOUT = 240.0

count_table: Any = CountTask.__table__  # type: ignore[attr-defined]


def test_workers_share_the_queue_and_run_each_task_once(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(count_table), [{"sleep": 0} for _ in range(TASKS)])

    env = {k: v for k, v in worker_env().items() if not k.startswith("ALCHQ_")}
    command = alchq_command(
        "run",
        "tests.tasks:CountTask",
        "--database-url",
        db_url,
        "--burst",
        "--log-level",
        "WARNING",
    )
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    started = time.monotonic()
    try:
        for i in range(WORKERS):
            # Output goes to files: a full pipe must not block a worker.
            err_path = tmp_path / f"worker{i}.stderr"
            with err_path.open("wb") as err:
                proc = subprocess.Popen(
                    command, stdout=err, stderr=subprocess.STDOUT, cwd=ROOT, env=env
                )
            procs.append((proc, err_path))
        deadline = started + TIMEOUT
        codes = [proc.wait(timeout=max(0.1, deadline - time.monotonic())) for proc, _ in procs]
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    elapsed = time.monotonic() - started
    outputs = [path.read_text() for _, path in procs]
    report = "\n".join(
        f"worker {i} exit {c}:\n{o}" for i, (c, o) in enumerate(zip(codes, outputs, strict=True))
    )

    assert codes == [0] * WORKERS, report
    assert not any("Traceback" in o for o in outputs), report

    with engine.connect() as conn:
        by_status: dict[str, int] = dict(
            conn.execute(
                select(count_table.c.status, func.count()).group_by(count_table.c.status)
            ).all()
        )
        runs = conn.scalar(select(func.count()).select_from(run_log))
        distinct_tasks = conn.scalar(select(func.count(run_log.c.task_id.distinct())))
        per_pid: dict[int, int] = dict(
            conn.execute(select(run_log.c.pid, func.count()).group_by(run_log.c.pid)).all()
        )
        max_attempts = conn.scalar(select(func.max(count_table.c.alchq_attempts)))
        owners = conn.scalar(select(func.count(count_table.c.alchq_worker.distinct())))

    print(
        f"\n{engine.dialect.name}: {TASKS} tasks, {WORKERS} worker processes: "
        f"{elapsed:.1f}s wall ({TASKS / elapsed:.0f} tasks/s); "
        f"tasks per worker {sorted(per_pid.values())}"
    )
    assert by_status == {Status.PROCESSED: TASKS}, by_status
    assert runs == TASKS
    assert distinct_tasks == TASKS  # exactly once: none twice, none lost
    assert max_attempts == 1  # no task was claimed twice
    assert set(per_pid) <= {proc.pid for proc, _ in procs}
    assert len(per_pid) > 1, f"one worker did all the work: {per_pid}"
    assert owners == len(per_pid)
