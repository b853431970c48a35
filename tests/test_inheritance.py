"""Task models with inheritance (tests/models_inherit.py), served by real worker processes.

Single-table inheritance: a worker serving a subclass claims, recovers and
prunes only that subclass's rows (and its own subclasses'); serving the base
runs every row with its own class's run(). Joined-table inheritance is refused.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Column, Engine, ForeignKey, Integer, String, select, text, update
from sqlalchemy.orm import DeclarativeBase, Session

import alchq
from alchq import BaseQueue, Status, TaskDefinitionError, utc_now
from alchq.model import rows_of, task_table
from tests.conftest import run_alchq
from tests.models_inherit import (
    EnqJob,
    EnqOwner,
    InhAbstractBase,
    InhBase,
    InhBigExport,
    InhConcrete,
    InhExport,
    InhOther,
    InhOwner,
    InhTask,
)

MODULE = "tests.models_inherit"


@pytest.fixture
def eng(engine: Engine) -> Iterator[Engine]:
    InhBase.metadata.create_all(engine)
    yield engine


def _add(engine: Engine, *kinds: type[InhTask]) -> list[int]:
    with Session(engine) as session:
        tasks = [kind() for kind in kinds]
        session.add_all(tasks)
        session.commit()
        return [t.id for t in tasks]


def _rows(engine: Engine) -> dict[int, tuple[str, str, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, kind, status, note FROM inh_task ORDER BY id"))
        return {r[0]: (r[1], r[2], r[3].split()[0] if r[3] else None) for r in rows}


def _serve(db_url: str, model: str, *extra: str) -> str:
    done = run_alchq("run", f"{MODULE}:{model}", "--database-url", db_url, "--burst", *extra)
    assert done.returncode == 0, done.stderr
    return done.stderr


EVERY_KIND = (InhTask, InhExport, InhOther, InhBigExport, InhOther, InhExport)


def test_a_worker_serving_a_subclass_claims_only_its_rows(eng: Engine, db_url: str) -> None:
    ids = _add(eng, *EVERY_KIND)
    log = _serve(db_url, "InhExport")
    assert "deleted after it was claimed" not in log, log
    rows = _rows(eng)
    assert {i: rows[i][1:] for i in ids} == {
        ids[0]: ("PENDING", None),
        ids[1]: ("PROCESSED", "InhExport"),
        ids[2]: ("PENDING", None),
        ids[3]: ("PROCESSED", "InhBigExport"),  # a subclass's rows are its parent's too
        ids[4]: ("PENDING", None),
        ids[5]: ("PROCESSED", "InhExport"),
    }

    _serve(db_url, "InhOther")
    rows = _rows(eng)
    assert [rows[i][1:] for i in (ids[2], ids[4])] == [("PROCESSED", "InhOther")] * 2
    assert rows[ids[0]][1] == "PENDING"


def test_a_worker_serving_the_base_runs_each_row_as_its_class(eng: Engine, db_url: str) -> None:
    ids = _add(eng, *EVERY_KIND)
    _serve(db_url, "InhTask")
    rows = _rows(eng)
    assert [rows[i][1:] for i in ids] == [("PROCESSED", kind.__name__) for kind in EVERY_KIND]


def test_a_base_without_run_is_served_through_its_subclasses(eng: Engine, db_url: str) -> None:
    with Session(eng) as session:
        session.add_all([InhConcrete(), InhConcrete()])
        session.commit()
    _serve(db_url, "InhAbstractBase")
    with eng.connect() as conn:
        notes = conn.execute(text("SELECT status, note FROM inh_abstract")).all()
    assert [tuple(n) for n in notes] == [("PROCESSED", "InhConcrete")] * 2
    assert InhAbstractBase.run is BaseQueue.run


def _lose(engine: Engine, ids: list[int]) -> None:
    """Make the rows claims of a worker that is gone, with their lease run out."""
    table = task_table(InhTask)
    with engine.begin() as conn:
        conn.execute(
            update(table)
            .where(table.c.id.in_(ids))
            .values(
                status=Status.PROCESSING.value,
                alchq_worker="gone-worker",
                alchq_attempts=1,
                alchq_started_at=utc_now(-120),
                alchq_lease_until=utc_now(-60),
            )
        )


def test_recovery_takes_back_only_the_subclasss_own_lost_claims(eng: Engine, db_url: str) -> None:
    export, other = _add(eng, InhExport, InhOther)
    _lose(eng, [export, other])
    _serve(db_url, "InhExport")
    rows = _rows(eng)
    assert rows[export][1:] == ("PROCESSED", "InhExport")
    assert rows[other][1] == "PROCESSING"  # not InhExport's to recover

    log = _serve(db_url, "InhOther")
    assert "InhOther" in log and "its worker was lost" in log, log
    assert _rows(eng)[other][1:] == ("PROCESSED", "InhOther")


def test_prune_of_a_subclass_deletes_only_its_rows(eng: Engine, db_url: str) -> None:
    ids = _add(eng, *EVERY_KIND)
    _serve(db_url, "InhTask")
    counts = alchq.prune(InhOther, engine=eng, processed=0)
    assert counts["PROCESSED"] == 2
    assert set(_rows(eng)) == {ids[0], ids[1], ids[3], ids[5]}
    done = run_alchq("prune", f"{MODULE}:InhExport", "--database-url", db_url, "--older-than", "0")
    assert done.returncode == 0, done.stderr
    assert set(_rows(eng)) == {ids[0]}


def test_enqueue_with_a_unique_key_sets_the_subclass_and_relationships(eng: Engine) -> None:
    with Session(eng) as session:
        owner = InhOwner(email="a@example.com")
        session.add(owner)
        # The owner is pending: enqueue() flushes it to learn its key.
        task, created = InhExport.enqueue(session, unique_key="k1", owner=owner, note="n")
        assert created and isinstance(task, InhExport) and task.owner is owner
        again, created = InhExport.enqueue(session, unique_key="k1", owner=owner)
        assert not created and again is task
        # The key is the table's: another subclass's holder is returned as itself.
        holder, created = InhOther.enqueue(session, unique_key="k1")
        assert not created and holder is task
        none, created = InhOther.enqueue(session, unique_key="k2", owner=None)
        assert created and none.owner_id is None
        # A new related object not in the session is saved, as the constructor's cascade does.
        fresh = InhOwner(email="b@example.com")
        task3, created = InhOther.enqueue(session, unique_key="k3", owner=fresh)
        assert created and fresh.id is not None and task3.owner_id == fresh.id
        session.commit()
        kinds = {k: v for k, v in session.execute(select(InhTask.unique_key, InhTask.kind))}
    assert kinds == {"k1": "export", "k2": "other", "k3": "other"}


def test_enqueue_refuses_a_collection_relationship_by_name(eng: Engine) -> None:
    InhBase.metadata.create_all(eng)
    with Session(eng) as session:
        with pytest.raises(TypeError, match=r"cannot set EnqJob\.notes .*set it on the task"):
            EnqJob.enqueue(session, unique_key="x", notes=[])
        owner = EnqOwner(jobs=[])
        session.add(owner)
        task, created = EnqJob.enqueue(session, unique_key="x", owner=owner)
        assert created and task.owner_id == owner.id


def test_joined_table_inheritance_is_refused_with_the_reason() -> None:
    class JtiBase(DeclarativeBase):
        pass

    class JtiTask(BaseQueue, JtiBase):
        __tablename__ = "jti_task"
        __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "task"}
        id = Column(Integer, primary_key=True)
        kind = Column(String(20))

        def run(self) -> None:
            pass

    with pytest.raises(TaskDefinitionError, match=r"joined-table inheritance.*single-table"):

        class JtiExport(JtiTask):
            __tablename__ = "jti_export"
            __mapper_args__ = {"polymorphic_identity": "export"}
            id = Column(Integer, ForeignKey("jti_task.id"), primary_key=True)
            path = Column(String(20))


def test_seed_form_subclass_is_single_table() -> None:
    """In alchq's own form too, a subclass shares its parent's table."""

    class SeedInhTask(BaseQueue):
        __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "task"}
        id = Column(Integer, primary_key=True)
        kind = Column(String(20))

        def run(self) -> None:
            pass

    class SeedInhExport(SeedInhTask):
        __mapper_args__ = {"polymorphic_identity": "export"}

    assert task_table(SeedInhExport) is task_table(SeedInhTask)
    where = str(rows_of(SeedInhExport).compile(compile_kwargs={"literal_binds": True}))
    assert where == "seed_inh_task.kind IN ('export')", where
