"""Batches: a busy queue's short tasks share commits, each keeping its own atomicity.

Every test checks the effect of each run (a ``batch_done`` row written in
run()'s transaction) exists exactly when its task is PROCESSED, once.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event, insert, select, update
from sqlalchemy.orm import Session

from alchq import Status, worker
from alchq._dialects import dialect_for
from alchq.worker import Worker
from tests.fault_tasks import UNLOADABLE
from tests.models_batch import (
    STARTS,
    STEAL,
    BatchTask,
    SoloTask,
    batch_done,
    batch_error,
    batch_metadata,
)


@pytest.fixture
def eng(engine: Engine) -> Iterator[Engine]:
    batch_metadata.create_all(engine)
    yield engine


def _add(engine: Engine, model: Any, actions: list[str], **values: Any) -> list[int]:
    with Session(engine) as session:
        session.execute(insert(model), [{"action": a, **values} for a in actions])
        session.commit()
        return list(session.scalars(select(model.id).order_by(model.id)))


def _commits(engine: Engine) -> list[int]:
    """A list that grows by one at every COMMIT on ``engine``."""
    seen: list[int] = []
    event.listen(engine, "commit", lambda conn: seen.append(1))
    return seen


def _state(engine: Engine, model: Any) -> dict[int, Any]:
    with engine.connect() as conn:
        return {
            r.id: r
            for r in conn.execute(
                select(model.id, model.status, model.alchq_attempts, model.alchq_lost_claims)
            )
        }


def _effects(engine: Engine, table: Any = batch_done) -> Counter[int]:
    with engine.connect() as conn:
        return Counter(conn.scalars(select(table.c.task_id)))


def _check_effects(engine: Engine, model: Any) -> dict[int, Any]:
    """Each task's effect exists exactly when it is PROCESSED, once."""
    state, done = _state(engine, model), _effects(engine)
    wrong = [
        (i, r.status, done[i])
        for i, r in state.items()
        if done[i] != (1 if r.status == Status.PROCESSED else 0)
    ]
    assert not wrong, f"(id, status, effects): {wrong[:10]}"
    return state


def test_a_busy_queue_shares_commits(eng: Engine) -> None:
    ids = _add(eng, BatchTask, ["ok"] * 300)
    commits = _commits(eng)
    assert worker.process_all(BatchTask, engine=eng) == 300
    state = _check_effects(eng, BatchTask)
    assert {r.status for r in state.values()} == {Status.PROCESSED}
    assert {r.alchq_attempts for r in state.values()} == {1}
    assert sorted(state) == ids
    # One claim and one outcome commit per task would be 600.
    assert len(commits) <= 300 // 4, len(commits)


def test_alchq_batch_1_gives_each_task_its_transactions(eng: Engine) -> None:
    _add(eng, SoloTask, ["ok"] * 40)
    commits = _commits(eng)
    assert worker.process_all(SoloTask, engine=eng) == 40
    _check_effects(eng, SoloTask)
    assert len(commits) >= 2 * 40


def test_a_quiet_queue_commits_each_task_at_once(eng: Engine) -> None:
    # Known-short tasks, then one at a time: each is committed before the next exists.
    _add(eng, BatchTask, ["ok"] * 50)
    w = Worker(BatchTask, engine=eng)
    assert w.process_all() == 50
    for _ in range(3):
        [tid] = _add(eng, BatchTask, ["ok"])[-1:]
        assert w.process_all() == 1
        assert _state(eng, BatchTask)[tid].status == Status.PROCESSED
    _check_effects(eng, BatchTask)


def test_process_n_takes_no_more_than_n(eng: Engine) -> None:
    _add(eng, BatchTask, ["ok"] * 60)
    w = Worker(BatchTask, engine=eng)
    assert w.process_n(30) == 30  # batches learnt on the way
    assert w.process_n(7) == 7
    state = _check_effects(eng, BatchTask)
    statuses = Counter(r.status for r in state.values())
    assert statuses == {Status.PROCESSED: 37, Status.PENDING: 23}
    # The rest were never claimed, or handed back unrun: not counted.
    assert {r.alchq_attempts for r in state.values() if r.status == Status.PENDING} == {0}


def test_a_failing_task_rolls_back_only_its_own_writes(eng: Engine) -> None:
    actions = ["raise" if i % 5 == 3 else "ok" for i in range(200)]
    ids = _add(eng, BatchTask, actions)
    commits = _commits(eng)
    assert worker.process_all(BatchTask, engine=eng) == 200
    state = _check_effects(eng, BatchTask)
    failing = {i for i, a in zip(ids, actions, strict=True) if a == "raise"}
    assert {i for i, r in state.items() if r.status == Status.ERROR} == failing
    assert {i for i, r in state.items() if r.status == Status.PROCESSED} == set(ids) - failing
    assert _effects(eng, batch_error) == Counter(dict.fromkeys(failing, 1))  # error() once
    assert len(commits) < 2 * 200  # the others still shared theirs


def test_a_run_that_commits_itself_loses_no_other_outcome(
    eng: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    actions = ["ok"] * 80 + ["commit"] + ["ok"] * 80
    _add(eng, BatchTask, actions)
    with caplog.at_level(logging.INFO, logger="alchq.worker"):
        assert worker.process_all(BatchTask, engine=eng) == len(actions)
    state = _check_effects(eng, BatchTask)
    assert {r.status for r in state.values()} == {Status.PROCESSED}
    assert {r.alchq_attempts for r in state.values()} == {1}
    assert "run() committed or rolled back the session itself" in caplog.text


def test_a_run_that_rolls_back_itself_loses_no_other_outcome(eng: Engine) -> None:
    actions = ["ok"] * 80 + ["rollback"] + ["ok"] * 80
    ids = _add(eng, BatchTask, actions)
    runs = worker.process_all(BatchTask, engine=eng)
    state = _check_effects(eng, BatchTask)
    assert {r.status for r in state.values()} == {Status.PROCESSED}
    assert runs == sum(r.alchq_attempts for r in state.values())
    # Tasks whose outcomes its rollback took with it ran again, counted as lost claims.
    again = [i for i in ids if state[i].alchq_attempts > 1]
    assert all(state[i].alchq_lost_claims == state[i].alchq_attempts - 1 for i in again)


def test_a_task_over_its_time_limit_inside_a_batch(eng: Engine) -> None:
    actions = ["ok"] * 60 + ["sleep"] + ["ok"] * 20
    ids = _add(eng, BatchTask, actions, sleep="30")
    assert worker.process_all(BatchTask, engine=eng) >= len(actions)
    state = _check_effects(eng, BatchTask)
    slow = ids[60]
    assert state[slow].status == Status.ERROR
    with eng.connect() as conn:
        error_type = conn.scalar(select(BatchTask.alchq_error_type).where(BatchTask.id == slow))
    assert error_type == "alchq.exceptions.TaskTimeoutError"
    assert {r.status for i, r in state.items() if i != slow} == {Status.PROCESSED}


def test_most_urgent_first_across_batches(eng: Engine) -> None:
    with Session(eng) as session:
        session.execute(
            insert(BatchTask),
            [{"action": "ok", "priority": (i * 7) % 5} for i in range(150)],
        )
        session.commit()
        priority: dict[int, int] = dict(
            session.execute(select(BatchTask.id, BatchTask.priority)).all()
        )
    STARTS.clear()
    commits = _commits(eng)
    assert worker.process_all(BatchTask, engine=eng) == 150
    assert len(commits) < 150  # batched
    ran = [priority[i] for i in STARTS]
    assert ran == sorted(ran)


def test_an_outcome_refused_in_a_batch_is_discarded_and_the_rest_commit(
    eng: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    # The row of one task of a batch is taken over while it runs (another thread,
    # as an operator or a rescuer would): its outcome must not overwrite the row.
    actions = ["noop"] * 60 + ["stolen"] + ["noop"] * 20
    ids = _add(eng, BatchTask, actions)
    stolen = ids[60]

    def steal(task_id: int) -> None:
        def take() -> None:
            with eng.begin() as conn:
                conn.execute(
                    update(BatchTask).where(BatchTask.id == task_id).values(alchq_worker="thief")
                )

        thread = threading.Thread(target=take)
        thread.start()
        thread.join(10)
        assert not thread.is_alive()

    STEAL[:] = [steal]
    with caplog.at_level(logging.WARNING, logger="alchq.worker"):
        assert worker.process_all(BatchTask, engine=eng) == len(actions)
    state = _state(eng, BatchTask)
    assert state[stolen].status == Status.PROCESSING
    with eng.connect() as conn:
        owner = conn.scalar(select(BatchTask.alchq_worker).where(BatchTask.id == stolen))
    assert owner == "thief"
    assert {r.status for i, r in state.items() if i != stolen} == {Status.PROCESSED}
    assert f"BatchTask {stolen}: this worker no longer holds the claim" in caplog.text


def test_a_batch_loads_its_tasks_from_the_claims_own_rows(
    eng: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Batches sized by time would be single claims on a machine too busy for a
    # no-op's run to fit the span: this is about how a batch loads its tasks.
    monkeypatch.setattr(worker, "BATCH_SPAN", 60.0)
    ids = _add(eng, BatchTask, ["noop"] * 120)
    selects: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM batch_task \n" in statement:
            selects.append(statement)  # a load of tasks (not the rescuer's look)

    event.listen(eng, "before_cursor_execute", seen)
    try:
        assert worker.process_all(BatchTask, engine=eng) == len(ids)
    finally:
        event.remove(eng, "before_cursor_execute", seen)
    assert {r.status for r in _state(eng, BatchTask).values()} == {Status.PROCESSED}
    if dialect_for(eng).returning:
        # Only the first task, claimed alone, is loaded by a SELECT of its own.
        assert len(selects) == 1, selects
    else:
        # No UPDATE ... RETURNING (MySQL): besides each claim's pick (FOR UPDATE), a
        # batch's rows are read back in one SELECT ... IN, never one by one.
        picks = [s for s in selects if "FOR UPDATE" in s]
        batch_reads = [s for s in selects if "FOR UPDATE" not in s and " IN (" in s]
        one_by_one = [s for s in selects if s not in picks and s not in batch_reads]
        assert len(one_by_one) == 1 and len(batch_reads) < len(ids) // 10, selects


def test_a_row_that_cannot_be_loaded_in_a_batch_fails_alone(eng: Engine) -> None:
    ids = _add(eng, BatchTask, ["ok"] * 20)
    with eng.begin() as conn:
        conn.execute(
            update(BatchTask.__table__)  # type: ignore[arg-type]
            .where(BatchTask.id == ids[10])
            .values(payload=UNLOADABLE)
        )
    worker.process_all(BatchTask, engine=eng)
    state = _check_effects(eng, BatchTask)
    assert [i for i, r in state.items() if r.status != Status.PROCESSED] == [ids[10]]
    assert state[ids[10]].status == Status.ERROR
    assert all(r.alchq_attempts == 1 for r in state.values())


def test_a_savepoint_holds_every_way_a_run_writes(eng: Engine) -> None:
    """A batched run's SAVEPOINT begins at its first statement, whichever way it is
    sent: a failing run loses what it wrote and what it changed in memory only."""
    actions = ["ok", "core", "core_raise", "ok", "dirty_core_raise", "dirty_raise", "ok"]
    actions += ["dirty_query_raise", "ok"]
    ids = _add(eng, BatchTask, ["ok"] + actions * 4)
    assert worker.process_all(BatchTask, engine=eng) == len(ids)
    state = _check_effects(eng, BatchTask)
    with eng.connect() as conn:
        rows = {r.id: r for r in conn.execute(select(BatchTask.__table__))}
    failing = [i for i in ids if rows[i].action.endswith("raise")]
    assert {state[i].status for i in failing} == {Status.ERROR}
    assert {rows[i].sleep for i in ids} == {None}  # no change of a failed run was kept
    assert {state[i].status for i in ids if i not in failing} == {Status.PROCESSED}


def test_a_run_that_deletes_its_own_row_in_a_batch_is_done(eng: Engine) -> None:
    ids = _add(eng, BatchTask, ["ok"] * 30 + ["delete_self"] + ["ok"] * 30)
    assert worker.process_all(BatchTask, engine=eng) == len(ids)
    state = _check_effects(eng, BatchTask)
    assert ids[30] not in state and _effects(eng)[ids[30]] == 1
    assert {r.status for r in state.values()} == {Status.PROCESSED}
    assert {r.alchq_attempts for r in state.values()} == {1}


def test_a_run_that_changes_alchqs_counters_in_a_batch_fails_alone(eng: Engine) -> None:
    ids = _add(eng, BatchTask, ["ok"] * 30 + ["tamper"] + ["ok"] * 30)
    worker.process_all(BatchTask, engine=eng)
    state = _check_effects(eng, BatchTask)
    assert state[ids[30]].status == Status.ERROR
    assert {r.status for i, r in state.items() if i != ids[30]} == {Status.PROCESSED}
    with eng.connect() as conn:
        message = conn.scalar(select(BatchTask.alchq_error_message).where(BatchTask.id == ids[30]))
    assert "run() changed alchq_failures" in str(message)


def test_a_writing_run_whose_claim_is_taken_over_loses_its_writes_alone(
    eng: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """Its SAVEPOINT is rolled back: the stolen row keeps its new owner and none of the
    run's writes; every other task of the batch commits, effect once."""
    if eng.dialect.name == "sqlite":
        pytest.skip("SQLite: the thief would wait for the batch's write lock")
    ids = _add(eng, BatchTask, ["ok"] * 30 + ["stolen_write"] + ["ok"] * 30)
    stolen = ids[30]

    def steal(task_id: int) -> None:
        with eng.begin() as conn:
            conn.execute(
                update(BatchTask).where(BatchTask.id == task_id).values(alchq_worker="thief")
            )

    STEAL[:] = [steal]
    with caplog.at_level(logging.WARNING, logger="alchq.worker"):
        worker.process_all(BatchTask, engine=eng)
    state = _state(eng, BatchTask)
    assert state[stolen].status == Status.PROCESSING
    done = _effects(eng)
    assert done[stolen] == 0
    others = [i for i in ids if i != stolen]
    assert {state[i].status for i in others} == {Status.PROCESSED}
    assert {done[i] for i in others} == {1}
    assert f"BatchTask {stolen}: this worker no longer holds the claim" in caplog.text
