"""The hardening issue's isolation-level and interpreter cases with the default settings.

The fault suite runs with short timings (a 0.5 s heartbeat, a 3 s lease); these
run the same cases with the defaults (10 s heartbeat, 60 s lease, rescue every
15 s), so they take a minute or so each. A module of their own: pytest-xdist
runs them beside the other files.
"""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text

from alchq import Status
from alchq.config import Settings
from tests.faults.conftest import Queue, Workers, check_invariants
from tests.support import wait_until

DEFAULTS = {
    "ALCHQ_HEARTBEAT_INTERVAL": str(Settings().heartbeat_interval),
    "ALCHQ_LEASE": str(Settings().lease),
    "ALCHQ_RESCUE_INTERVAL": str(Settings().rescue_interval),
    "ALCHQ_GRACE_PERIOD": str(Settings().grace_period),
    "ALCHQ_KILL_AFTER": str(Settings().kill_after),
    "ALCHQ_POLL_INTERVAL": str(Settings().poll_interval),
}


def test_a_writing_task_longer_than_the_heartbeat_under_repeatable_read(
    queue: Queue, workers: Workers
) -> None:
    if queue.dialect != "postgresql":
        pytest.skip("PostgreSQL only")
    name = queue.engine.url.database
    admin = create_engine(queue.engine.url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(
                text(
                    f'ALTER DATABASE "{name}" '
                    "SET default_transaction_isolation = 'repeatable read'"
                )
            )
    finally:
        admin.dispose()
    heartbeat = Settings().heartbeat_interval
    (task,) = queue.add(action="ok", sleep=int(heartbeat * 1000 + 3000))
    w = workers.start(env=DEFAULTS)
    wait_until(queue.settled, heartbeat + 40, "the task", w.tail, interval=0.5)
    row = queue.row(task)
    assert row.status == Status.PROCESSED and row.alchq_attempts == 1, row
    check_invariants(queue)
    workers.stop_all_cleanly(timeout=40)


def test_a_task_holding_the_interpreter_past_the_default_lease(
    queue: Queue, workers: Workers
) -> None:
    lease = Settings().lease
    (task,) = queue.add(action="gil", sleep=int(lease * 1000 + 5000))
    first = workers.start(env=DEFAULTS)
    wait_until(lambda: first.pid in queue.starts(task), 30, "the task to start", first.tail)
    second = workers.start(env=DEFAULTS)
    wait_until(queue.settled, lease + 60, "the task", first.tail, interval=0.5)
    row = queue.row(task)
    assert row.status == Status.PROCESSED, row
    assert row.alchq_attempts == 1 and row.alchq_lost_claims == 0, row
    assert queue.starts(task) == [first.pid]
    assert "lost" not in second.output()
    workers.stop_all_cleanly(timeout=40)
