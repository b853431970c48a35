"""Fault scenarios with batches in hand: real worker processes, real signals.

The tasks (action ``filed``) are short and write their effect (a ``fault_done``
row) in run()'s transaction, so a busy worker shares commits between them; their
starts are logged to files, outside the database. Each scenario ends with
:func:`check_invariants`: every task's effect exists exactly when it is
PROCESSED, once, and every extra start is explained by a lost claim.
"""

from __future__ import annotations

import signal
import time

from sqlalchemy import func, select, text

from alchq import Status
from tests.fault_tasks import fault_done
from tests.faults.conftest import RESCUE_WAIT, Queue, Workers, check_invariants
from tests.support import wait_until

TASKS = 3000


def _busy(queue: Queue, workers: Workers, at_least: int = 300) -> None:
    """Wait until the worker has done ``at_least`` tasks: batches are in hand by then."""
    wait_until(
        lambda: queue.counts().get("PROCESSED", 0) >= at_least,
        60,
        interval=0.02,
        what=f"{at_least} tasks processed",
        describe=workers.describe,
    )


def _drain(queue: Queue, workers: Workers) -> None:
    again = workers.start("--burst")
    assert again.wait(120) == 0, again.output()


def _commits(queue: Queue) -> int:
    """PostgreSQL: transactions committed in the queue's database so far (every session)."""
    with queue.engine.connect() as conn:
        conn.execute(text("SELECT pg_stat_clear_snapshot()"))
        return int(
            conn.scalar(
                text("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
            )
        )


def test_sigkill_mid_batch_commits_each_effect_exactly_when_processed(
    queue: Queue, workers: Workers
) -> None:
    queue.add(TASKS, action="filed", sleep=0)
    before = _commits(queue) if queue.dialect == "postgresql" else 0
    w = workers.start()
    _busy(queue, workers)
    # Killed while it holds a batch (several claims, some maybe run, none committed).
    wait_until(
        lambda: queue.counts().get("PROCESSING", 0) >= 2,
        30,
        interval=0.001,
        what="a batch in hand",
        describe=workers.describe,
    )
    assert workers.kill(w) == -signal.SIGKILL
    print(f"claims lost with the worker: {queue.counts().get('PROCESSING', 0)}")
    survivor = workers.start()
    wait_until(queue.settled, RESCUE_WAIT + 120, interval=0.2, describe=workers.describe)
    counts = check_invariants(queue, quiet_dir=workers.quiet_dir, describe=workers.describe)
    assert counts == {"PROCESSED": TASKS}, counts
    with queue.engine.connect() as conn:
        effects = conn.scalar(select(func.count()).select_from(fault_done))
    assert effects == TASKS
    if queue.dialect == "postgresql":
        # Two commits per task (claim, outcome) without batches; the server's
        # counts may lag a little, so only a wide margin is asserted.
        workers.stop_all_cleanly()
        wait_until(lambda: _commits(queue) > before, 10, what="commit counts")
        assert _commits(queue) - before < TASKS, "tasks did not share commits"
    else:
        workers.stop_all_cleanly()
    assert survivor.proc.returncode == 0


def test_sigterm_with_a_batch_in_hand_finishes_the_task_and_hands_back_the_rest(
    queue: Queue, workers: Workers
) -> None:
    queue.add(TASKS, action="filed", sleep=0)
    w = workers.start()
    _busy(queue, workers)
    workers.term(w)
    assert w.wait(30) == 0, w.output()
    # Nothing left PROCESSING: the batch's outcomes committed, the tasks it had
    # claimed but not started handed back unrun (not counted as attempts).
    counts = queue.counts()
    assert "PROCESSING" not in counts, counts
    rows = queue.rows()
    pending = [r for r in rows.values() if r.status == Status.PENDING]
    assert pending, "the worker drained everything before SIGTERM"
    assert {r.alchq_attempts for r in pending} == {0}
    check_invariants(queue, quiet_dir=workers.quiet_dir, describe=workers.describe)
    _drain(queue, workers)
    counts = check_invariants(queue, quiet_dir=workers.quiet_dir, describe=workers.describe)
    assert counts == {"PROCESSED": TASKS}, counts


def test_two_workers_batching_side_by_side_run_each_task_once(
    queue: Queue, workers: Workers
) -> None:
    queue.add(TASKS, action="filed", sleep=0)
    pair = [workers.start(), workers.start()]
    wait_until(queue.settled, 120, interval=0.2, describe=workers.describe)
    counts = check_invariants(queue, quiet_dir=workers.quiet_dir, describe=workers.describe)
    assert counts == {"PROCESSED": TASKS}, counts
    rows = queue.rows()
    assert {r.alchq_attempts for r in rows.values()} == {1}
    owners = {r.alchq_worker for r in rows.values()}
    assert len(owners) == 2, "one worker took every task"
    workers.stop_all_cleanly()
    assert all(p.proc.returncode == 0 for p in pair)


def test_an_idle_worker_after_a_batch_is_not_taken_for_one_holding_a_task(
    queue: Queue, workers: Workers
) -> None:
    """Within a batch the supervisor hears of each task as it starts, and of the
    last one's end only when the batch is over: once idle, longer than a time limit
    and its kill_after, the worker is not stopped or replaced for a stale task."""
    queue.add(400, action="filed")
    env = {"FAULT_TIME_LIMIT": "1", "ALCHQ_KILL_AFTER": "0.5"}
    w = workers.start(env=env)
    wait_until(lambda: queue.counts() == {"PROCESSED": 400}, 60, "drained", workers.describe)
    time.sleep(3)  # past 1 s + 0.5 s + the supervisor's margin
    assert w.alive(), w.tail()
    out = w.output()
    assert "time limit" not in out and "killing" not in out, out[-2000:]
    assert out.count("worker process 1 (pid") == 1, out[-2000:]  # never replaced
    check_invariants(queue, quiet_dir=workers.quiet_dir)
    workers.stop_all_cleanly()
