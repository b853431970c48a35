"""enqueue_many(): thousands of tasks in a few round trips, in the caller's transaction."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select
from sqlalchemy.orm import Session

from alchq import Status, metadata, worker
from tests.models_inherit import InhBase, InhExport, InhTask
from tests.tasks import CountTask, run_log


@pytest.fixture
def eng(engine: Engine) -> Iterator[Engine]:
    metadata.create_all(engine)
    InhBase.metadata.create_all(engine)
    yield engine


def _count_statements(engine: Engine) -> list[str]:
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "INSERT" in statement.upper():
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    return seen


def test_thousands_of_tasks_in_a_few_statements(eng: Engine) -> None:
    inserts = _count_statements(eng)
    with Session(eng) as session:
        created = CountTask.enqueue_many(session, ({"sleep": 0} for _ in range(5000)))
        assert created == 5000
        # Nothing committed yet: the caller's transaction decides.
        assert session.scalar(select(func.count()).select_from(CountTask)) == 5000
        session.rollback()
        assert session.scalar(select(func.count()).select_from(CountTask)) == 0
        assert len(inserts) <= 5000 // 100, len(inserts)  # batched, not one per row
        CountTask.enqueue_many(session, [{} for _ in range(500)])
        session.commit()
    with Session(eng) as session:
        statuses = session.scalars(select(CountTask.status).distinct()).all()
    assert statuses == [Status.PENDING]
    assert worker.process_all(CountTask, engine=eng) == 500
    with eng.connect() as conn:
        assert conn.execute(select(func.count()).select_from(run_log)).scalar_one() == 500


def test_unique_keys_are_honoured(eng: Engine) -> None:
    with Session(eng) as session:
        CountTask.enqueue(session, unique_key="held")
        created = CountTask.enqueue_many(
            session,
            [
                {"unique_key": "held"},  # a PENDING task holds it
                {"unique_key": "new"},
                {"unique_key": "new"},  # an earlier row of this call does
                {"unique_key": None},
                {},
                {"unique_key": "other", "priority": 5},  # other keys: its own statement
            ],
        )
        session.commit()
        assert created == 4
        keys = sorted(str(k) for k in session.scalars(select(CountTask.unique_key)))
    assert keys == ["None", "None", "held", "new", "other"]


def test_run_at_timedelta_is_from_the_database_clock(eng: Engine) -> None:
    with Session(eng) as session:
        CountTask.enqueue_many(session, [{"run_at": timedelta(hours=1)}, {}])
        session.commit()
        rows = session.execute(select(CountTask.run_at, CountTask.time_created)).all()
    later = [r for r in rows if r.run_at > r.time_created + timedelta(minutes=59)]
    assert len(later) == 1
    assert worker.process_all(CountTask, engine=eng) == 1  # the other one is not due


def test_single_table_subclass_rows_get_their_discriminator(eng: Engine) -> None:
    with Session(eng) as session:
        assert InhExport.enqueue_many(session, [{"note": "a"}, {"note": "b"}]) == 2
        session.commit()
        assert {t.kind for t in session.scalars(select(InhTask))} == {"export"}


def test_bad_keys_are_refused_by_name(eng: Engine) -> None:
    with Session(eng) as session:
        with pytest.raises(TypeError, match=r"'nope' is not a column of CountTask"):
            CountTask.enqueue_many(session, [{"nope": 1}])
        with pytest.raises(TypeError, match=r"'owner' is not a column.*foreign key"):
            InhTask.enqueue_many(session, [{"owner": None}])
        assert CountTask.enqueue_many(session, []) == 0
