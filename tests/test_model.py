"""BaseQueue models: both forms, the seed's demo, the columns, the index, Alembic.

The models are defined once, at import, in tests/models_*.py: seed-form models
live in the global ``alchq.metadata``, so each class/table name may exist only
once per test session.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy.dialects.mysql
from alembic.autogenerate import compare_metadata, produce_migrations, render_python_code
from alembic.migration import MigrationContext
from alembic.operations import Operations
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from flask_sqlalchemy.model import camel_to_snake_case
from sqlalchemy import (
    CheckConstraint,
    Connection,
    Engine,
    Integer,
    MetaData,
    Table,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import DeclarativeBase, Session, mapped_column
from sqlalchemy.schema import CreateTable

import alchq
from alchq import BaseQueue, Status, TaskDefinitionError, metadata, worker
from tests import models_seed_mixin_tasks, models_seed_tasks
from tests.models_forms import (
    MtAbstractTask,
    MtColumnsTask,
    MtDeclBase,
    MtDeclOwner,
    MtDeclTask,
    MtFsaDeclOwner,
    MtFsaDeclTask,
    MtFsaOwner,
    MtFsaTask,
    MtHTTPFetchTask,
    MtLegacyBase,
    MtLegacyOwner,
    MtLegacyTask,
    MtNoRunTask,
    MtSeedFormTask,
    mt_fsa_db,
    mt_fsa_decl_db,
)
from tests.models_seed_app import create_app
from tests.models_seed_app import db as seed_db
from tests.support import check_refused

POSTGRESQL_ONLY = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)

_app_names = itertools.count()


# -- helpers --------------------------------------------------------------------------------


def _table(model: Any) -> Table:
    """A mapped model's table (typed: seed-form models have no ``__table__`` for mypy)."""
    table = inspect(model).local_table
    assert isinstance(table, Table)
    return table


def _create(engine: Engine, *models: Any) -> None:
    """Create only these seed-form tables (alchq.metadata also holds other tests' models)."""
    metadata.create_all(engine, tables=[_table(m) for m in models])


@contextmanager
def _flask_app(db: SQLAlchemy, db_url: str) -> Iterator[Flask]:
    """A Flask app using ``db`` on ``db_url``, inside its app context."""
    app = Flask(f"mt_app_{next(_app_names)}")
    app.config["SQLALCHEMY_DATABASE_URI"] = db_url
    db.init_app(app)
    with app.app_context():
        try:
            yield app
        finally:
            db.session.remove()
            for eng in db.engines.values():
                eng.dispose()


def _db_now(conn: Connection) -> datetime:
    """The database's own clock, as alchq reads it (UTC, aware)."""
    if conn.dialect.name == "postgresql":
        value = conn.scalar(text("SELECT statement_timestamp()"))
        assert isinstance(value, datetime)
        return value.astimezone(timezone.utc)
    if conn.dialect.name in ("mysql", "mariadb"):
        value = conn.scalar(text("SELECT UTC_TIMESTAMP(6)"))
        assert isinstance(value, datetime)
        return value.replace(tzinfo=timezone.utc)
    raw = conn.scalar(text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')"))
    return datetime.fromisoformat(raw).replace(tzinfo=timezone.utc)


def _wait_for_db_clock_after(engine: Engine, moment: datetime, timeout: float = 5.0) -> None:
    """Poll until the database clock is strictly later than ``moment``."""
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            if _db_now(conn) > moment:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"database clock did not pass {moment} within {timeout}s")
        time.sleep(0.002)


def _is_utc(value: datetime | None) -> bool:
    return value is not None and value.tzinfo is not None and value.utcoffset() == timedelta(0)


def _ready_index(engine: Engine, table: str) -> dict[str, Any]:
    indexes = {ix["name"]: ix for ix in inspect(engine).get_indexes(table)}
    name = f"ix_{table}_alchq_ready"
    assert name in indexes, f"{name} missing; indexes: {sorted(map(str, indexes))}"
    return dict(indexes[name])


def _assert_ready_index(engine: Engine, table: str, pk: str = "id") -> None:
    ix = _ready_index(engine, table)
    assert ix["column_names"] == ["status", "priority", "time_created", pk]
    assert not ix["unique"]
    if engine.dialect.name in ("mysql", "mariadb"):
        return  # no partial indexes: the index leads with status instead
    # Partial on both databases: only PENDING rows are indexed.
    where = ix.get("dialect_options", {}).get(f"{engine.dialect.name}_where")
    assert where is not None and "PENDING" in str(where), ix


# -- 1. the seed's form ---------------------------------------------------------------------------


def test_seed_form_is_mapped_by_alchq_into_alchq_metadata() -> None:
    mapper = inspect(MtSeedFormTask)
    table = _table(MtSeedFormTask)
    assert mapper.local_table is table
    assert table.name == "mt_seed_form_task"
    assert metadata.tables["mt_seed_form_task"] is table
    assert _table(MtHTTPFetchTask).name == "mt_http_fetch_task"
    assert metadata.tables["mt_http_fetch_task"] is _table(MtHTTPFetchTask)
    assert alchq.metadata is metadata
    assert {
        "id",
        "name",
        "result",
        "status",
        "time_created",
        "time_updated",
        "run_at",
        "priority",
        "unique_key",
        "alchq_attempts",
        "alchq_failures",
        "alchq_worker",
        "alchq_started_at",
        "alchq_finished_at",
        "alchq_lease_until",
        "alchq_lost_claims",
        "alchq_error_type",
        "alchq_error_message",
        "alchq_traceback",
    } == set(table.c.keys())
    assert [c.name for c in table.primary_key] == ["id"]
    # Each model gets its own columns, not shared Column objects.
    assert _table(MtSeedFormTask).c.status is not _table(MtHTTPFetchTask).c.status


@pytest.mark.parametrize(
    "class_name, table_name",
    [
        ("MyTask", "my_task"),
        ("HTTPTask", "http_task"),
        ("Task", "task"),
        ("MyHTTPTask", "my_http_task"),
        ("SendEmail2Task", "send_email2_task"),
        ("ABC", "abc"),
    ],
)
def test_table_name_is_snake_case_as_flask_sqlalchemy_makes_it(
    class_name: str, table_name: str
) -> None:
    # A private DeclarativeBase per call, so that these common names cannot clash
    # with other models in alchq.metadata; the name comes from BaseQueue's
    # __tablename__, which the seed form uses too (see the test above).
    class Base(DeclarativeBase):
        pass

    cls = type(
        class_name,
        (BaseQueue, Base),
        {"__module__": __name__, "id": mapped_column(Integer, primary_key=True)},
    )
    assert _table(cls).name == table_name
    assert camel_to_snake_case(class_name) == table_name
    assert table_name not in metadata.tables or metadata.tables[table_name] is not _table(cls)


def test_seed_form_with_a_plain_session(engine: Engine) -> None:
    metadata.create_all(engine, tables=[_table(MtSeedFormTask)])
    with Session(engine) as session:
        session.add(MtSeedFormTask(name="plain"))
        session.commit()
        task = session.scalars(select(MtSeedFormTask)).one()
        assert task.status is Status.PENDING
        assert isinstance(task.id, int)
        task_id = task.id

    processed = worker.process_one(MtSeedFormTask, engine=engine)
    assert isinstance(processed, MtSeedFormTask)
    assert processed.id == task_id
    assert processed.status is Status.PROCESSED
    assert processed.result == "ran plain"

    with Session(engine) as session:
        row = session.get_one(MtSeedFormTask, task_id)
        assert (row.status, row.result, row.alchq_attempts) == (Status.PROCESSED, "ran plain", 1)
    assert worker.process_one(MtSeedFormTask, engine=engine) is None


def test_seed_form_with_flask_sqlalchemy_session(db_url: str) -> None:
    db = SQLAlchemy()
    with _flask_app(db, db_url):
        _create(db.engine, MtSeedFormTask)
        db.session.add(MtSeedFormTask(name="flask"))
        db.session.commit()
        task = db.session.scalars(select(MtSeedFormTask)).one()
        assert task.status is Status.PENDING
        db.session.remove()

        processed = worker.process_one(MtSeedFormTask)  # Flask's db.session, no argument
        assert isinstance(processed, MtSeedFormTask)
        assert processed.result == "ran flask"
        db.session.remove()

        row: Any = db.session.scalars(select(MtSeedFormTask)).one()
        assert (row.status, row.result) == (Status.PROCESSED, "ran flask")


# -- 2. the mixin form ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MixinCase:
    id: str
    task: Any
    owner: Any
    metadata: MetaData
    db: SQLAlchemy | None = None


MIXIN_CASES = [
    MixinCase("DeclarativeBase", MtDeclTask, MtDeclOwner, MtDeclBase.metadata),
    MixinCase("declarative_base", MtLegacyTask, MtLegacyOwner, MtLegacyBase.metadata),
    MixinCase("db.Model", MtFsaTask, MtFsaOwner, mt_fsa_db.metadata, mt_fsa_db),
    MixinCase(
        "model_class", MtFsaDeclTask, MtFsaDeclOwner, mt_fsa_decl_db.metadata, mt_fsa_decl_db
    ),
]
mixin_cases = pytest.mark.parametrize("case", MIXIN_CASES, ids=[c.id for c in MIXIN_CASES])


@mixin_cases
def test_mixin_form_table_is_in_the_apps_metadata(case: MixinCase) -> None:
    table = _table(case.task)
    assert inspect(case.task).local_table is table
    assert table.metadata is case.metadata
    assert table.metadata is not metadata
    assert table.name not in metadata.tables
    assert case.metadata.tables[table.name] is table
    assert {"status", "time_created", "time_updated", "alchq_attempts"} <= set(table.c.keys())
    assert [fk.column.table for fk in table.foreign_keys] == [_table(case.owner)]
    assert any(ix.name == f"ix_{table.name}_alchq_ready" for ix in table.indexes)
    assert case.task().status is Status.PENDING


def _check_mixin_schema(engine: Engine, case: MixinCase) -> None:
    table = _table(case.task).name
    _assert_ready_index(engine, table)
    fks = inspect(engine).get_foreign_keys(table)
    assert [(fk["constrained_columns"], fk["referred_table"]) for fk in fks] == [
        (["owner_id"], _table(case.owner).name)
    ]


def _sqlite_foreign_keys(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


@mixin_cases
def test_mixin_form_create_all_foreign_key_and_worker(case: MixinCase, db_url: str) -> None:
    if case.db is None:
        engine = create_engine(db_url)
        if engine.dialect.name == "sqlite":  # SQLite enforces foreign keys only when asked
            event.listen(engine, "connect", _sqlite_foreign_keys)
        try:
            case.metadata.create_all(engine)
            _check_mixin_schema(engine, case)
            with Session(engine) as session:
                owner = case.owner()
                session.add(owner)
                session.flush()
                session.add(case.task(owner_id=owner.id))
                session.commit()
            processed = worker.process_one(case.task, engine=engine)
            assert processed is not None
            assert processed.status is Status.PROCESSED
            assert worker.process_one(case.task, engine=engine) is None
            with Session(engine) as session:
                task = session.scalars(select(case.task)).one()
                assert task.status is Status.PROCESSED
                assert task.owner.runs == 1  # run()'s change, committed with PROCESSED
                session.add(case.task(owner_id=12345))
                with pytest.raises(IntegrityError):
                    session.commit()
        finally:
            engine.dispose()
        return

    db = case.db
    with _flask_app(db, db_url):
        db.create_all()
        _check_mixin_schema(db.engine, case)
        owner = case.owner()
        db.session.add(owner)
        db.session.flush()
        db.session.add(case.task(owner=owner))
        db.session.commit()
        db.session.remove()

        processed = worker.process_one(case.task)
        assert processed is not None
        assert processed.status is Status.PROCESSED
        db.session.remove()
        assert worker.process_one(case.task, session_factory=db) is None

        task = db.session.scalars(select(case.task)).one()
        assert task.status is Status.PROCESSED
        assert task.owner.runs == 1
        if db.engine.dialect.name == "postgresql":
            db.session.add(case.task(owner_id=12345))
            with pytest.raises(IntegrityError):
                db.session.commit()
            db.session.rollback()


# -- 3. the seed's demo, verbatim (PostgreSQL: gen_random_uuid()) ----------------------------------

SEED_FORMS = {
    "seed_form": (models_seed_tasks, models_seed_tasks.SeedTask),
    "mixin_form": (models_seed_mixin_tasks, models_seed_mixin_tasks.SeedMixinTask),
}
seed_forms = pytest.mark.parametrize("form", list(SEED_FORMS))


@contextmanager
def _seed_app(db_url: str, form: str) -> Iterator[tuple[ModuleType, Any]]:
    module, model = SEED_FORMS[form]
    app = create_app(db_url, name="my_app")
    with app.app_context():
        try:
            if _table(model).metadata is metadata:
                metadata.create_all(seed_db.engine, tables=[_table(model)])
            else:
                seed_db.create_all()
            yield module, model
        finally:
            seed_db.session.remove()
            seed_db.engine.dispose()


def _add_seed_task(model: Any, operation: str) -> None:
    # The seed's "Creating a task" snippet.
    seed_db.session.add(model(operation=operation))
    seed_db.session.commit()


def _seed_rows(model: Any) -> list[Any]:
    seed_db.session.remove()
    return list(seed_db.session.scalars(select(model).order_by(model.time_created, model.id)))


def test_seed_models_keep_the_seeds_names() -> None:
    assert models_seed_tasks.MyTask is models_seed_tasks.SeedTask
    assert _table(models_seed_tasks.SeedTask).metadata is metadata
    assert models_seed_mixin_tasks.MyTask is models_seed_mixin_tasks.SeedMixinTask
    assert _table(models_seed_mixin_tasks.SeedMixinTask).metadata is seed_db.metadata


@POSTGRESQL_ONLY
@seed_forms
def test_seed_demo_hop_skip_jump_are_processed(
    db_url: str, form: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with _seed_app(db_url, form) as (_module, model):
        for operation in ("hop", "skip", "jump"):
            _add_seed_task(model, operation)
        rows = _seed_rows(model)
        assert [r.status for r in rows] == [Status.PENDING] * 3
        assert all(isinstance(r.id, uuid.UUID) for r in rows)  # gen_random_uuid()
        assert [r.retries for r in rows] == [0, 0, 0]

        assert worker.process_n(model, 3) == 3

        rows = _seed_rows(model)
        assert [(r.operation, r.status) for r in rows] == [
            ("hop", Status.PROCESSED),
            ("skip", Status.PROCESSED),
            ("jump", Status.PROCESSED),
        ]
        assert worker.process_one(model) is None
    out = capsys.readouterr().out.splitlines()
    assert out == ["Hippity-hop!", "Skipped a beat!", "Jumped 3 feet!"]


@POSTGRESQL_ONLY
@seed_forms
def test_seed_demo_bad_operation_is_error_with_value_error(
    db_url: str, form: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with _seed_app(db_url, form) as (_module, model):
        _add_seed_task(model, "cartwheel")
        task = worker.process_one(model)
        assert task is not None

        [row] = _seed_rows(model)  # no retry row for a ValueError
        assert row.status is Status.ERROR
        assert row.alchq_error_type == "ValueError"
        assert row.alchq_error_message == "Operation wasn't hop, skip, or jump!"
        assert row.alchq_traceback is not None and "ValueError" in row.alchq_traceback
        assert row.retries == 0

    found = [r for r in caplog.records if r.getMessage() == "I found a ValueError!"]
    assert len(found) == 1
    assert found[0].name == "my_app" and found[0].levelno == logging.ERROR
    ended = [r.getMessage() for r in caplog.records if r.name == "alchq.worker"]
    assert any(
        re.fullmatch(
            rf"{model.__name__} {row.id} ERROR in \d+\.\d{{3}}s: "
            r"ValueError: Operation wasn't hop, skip, or jump!",
            m,
        )
        for m in ended
    ), ended


@POSTGRESQL_ONLY
@seed_forms
def test_seed_demo_other_exception_retries_as_new_rows(
    db_url: str, form: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run() fails with something other than ValueError: error() adds a retry row.

    The seed's run() raises only ValueError itself; what else can fail in it is
    print(). A ``print`` that raises BrokenPipeError (stdout gone, as for a
    daemonized worker) is patched into the model's module, leaving the body verbatim.
    """
    module = SEED_FORMS[form][0]

    def broken_print(*args: object, **kwargs: object) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(module, "print", broken_print, raising=False)
    caplog.set_level(logging.INFO)
    with _seed_app(db_url, form) as (_module, model):
        _add_seed_task(model, "hop")

        assert worker.process_one(model) is not None
        rows = _seed_rows(model)
        assert [(r.status, r.retries, r.operation) for r in rows] == [
            (Status.ERROR, 0, "hop"),
            (Status.PENDING, 1, "hop"),
        ]
        assert rows[0].alchq_error_type == "BrokenPipeError"
        assert rows[1].alchq_attempts == 0
        assert rows[1].id != rows[0].id

        # retries 1 and 2 each add one more row; retries 3 gives up.
        assert worker.process_all(model) == 3
        rows = _seed_rows(model)
        assert [(r.status, r.retries) for r in rows] == [
            (Status.ERROR, 0),
            (Status.ERROR, 1),
            (Status.ERROR, 2),
            (Status.ERROR, 3),
        ]
        assert {r.alchq_error_type for r in rows} == {"BrokenPipeError"}
        assert worker.process_one(model) is None

    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("Max retries exceeded.") == 1
    assert "I found a ValueError!" not in messages
    assert not [m for m in messages if "error() raised" in m]


# -- 4. the columns BaseQueue adds ---------------------------------------------------------------


def test_new_row_is_pending_before_flush() -> None:
    assert MtColumnsTask().status is Status.PENDING
    assert MtColumnsTask(name="x").status is Status.PENDING
    assert MtColumnsTask(status=Status.ERROR).status is Status.ERROR
    for case in MIXIN_CASES:
        assert case.task().status is Status.PENDING


def test_unknown_keyword_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="'nope' is an invalid keyword argument for MtColumnsTask"):
        MtColumnsTask(nope=1)


def test_status_is_pending_in_the_database_after_insert(engine: Engine) -> None:
    _create(engine, MtColumnsTask)
    with Session(engine) as session:
        task = MtColumnsTask()
        session.add(task)
        session.commit()
        task_id = task.id
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT status, alchq_attempts FROM mt_columns_task WHERE id = :id"),
            {"id": task_id},
        ).one()
    assert tuple(row) == ("PENDING", 0)


def test_raw_insert_gets_pending_from_the_server_default(engine: Engine) -> None:
    _create(engine, MtColumnsTask)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO mt_columns_task (name) VALUES ('raw')"))
        row = conn.execute(
            text("SELECT status, alchq_attempts, time_created, time_updated FROM mt_columns_task")
        ).one()
    assert row[0] == "PENDING"
    assert row[1] == 0
    assert row[2] is not None and row[3] is not None

    with Session(engine) as session:
        task = session.scalars(select(MtColumnsTask)).one()
        assert task.status is Status.PENDING
        assert _is_utc(task.time_created)
    # A row inserted behind the ORM's back is a task like any other.
    processed = worker.process_one(MtColumnsTask, engine=engine)
    assert processed is not None and processed.status is Status.PROCESSED


def test_unknown_status_is_rejected_by_the_check_constraint(engine: Engine) -> None:
    _create(engine, MtColumnsTask)
    refused = check_refused(engine)
    with pytest.raises(refused), engine.begin() as conn:
        conn.execute(text("INSERT INTO mt_columns_task (name, status) VALUES ('x', 'BOGUS')"))
    with pytest.raises(refused), engine.begin() as conn:
        conn.execute(text("INSERT INTO mt_columns_task (name, status) VALUES ('x', 'pending')"))
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO mt_columns_task (name) VALUES ('ok')"))
    with pytest.raises(refused), engine.begin() as conn:
        conn.execute(text("UPDATE mt_columns_task SET status = 'DONE'"))
    with engine.connect() as conn:
        assert conn.scalar(text("SELECT status FROM mt_columns_task")) == "PENDING"


def test_unknown_status_is_refused_by_the_orm(engine: Engine) -> None:
    _create(engine, MtColumnsTask)
    with Session(engine) as session:
        session.add(MtColumnsTask(status="BOGUS"))
        with pytest.raises(StatementError, match="BOGUS"):
            session.commit()


def test_status_is_a_str_enum_usable_in_queries(engine: Engine) -> None:
    assert issubclass(Status, str)
    assert [s.value for s in Status] == ["PENDING", "PROCESSING", "PROCESSED", "ERROR", "CANCELLED"]
    assert Status.PENDING == "PENDING"
    assert str(Status.ERROR) == "ERROR" and f"{Status.PROCESSED}" == "PROCESSED"
    assert Status("PROCESSING") is Status.PROCESSING

    _create(engine, MtColumnsTask)
    with Session(engine) as session:
        session.add_all(
            [
                MtColumnsTask(name="a"),
                MtColumnsTask(name="b", status=Status.ERROR),
                MtColumnsTask(name="c", status="PROCESSED"),
            ]
        )
        session.commit()

        def names(*where: Any) -> list[str | None]:
            return list(session.scalars(select(MtColumnsTask.name).where(*where).order_by("name")))

        assert names(MtColumnsTask.status == Status.PENDING) == ["a"]
        assert names(MtColumnsTask.status == "PENDING") == ["a"]
        assert names(MtColumnsTask.status != "PENDING") == ["b", "c"]
        assert names(MtColumnsTask.status.in_([Status.ERROR, "PROCESSED"])) == ["b", "c"]
        loaded = session.scalars(select(MtColumnsTask).order_by(MtColumnsTask.name)).all()
        assert [t.status for t in loaded] == [Status.PENDING, Status.ERROR, Status.PROCESSED]
        assert all(type(t.status) is Status for t in loaded)


def _time_engine(db_url: str) -> Engine:
    """An engine whose session time zone is not UTC (+05:45), where it has one."""
    if db_url.startswith("postgresql"):
        return create_engine(db_url, connect_args={"options": "-c TimeZone=Asia/Kathmandu"})
    if db_url.startswith("mysql"):
        return create_engine(db_url, connect_args={"init_command": "SET time_zone = '+05:45'"})
    return create_engine(db_url)


def test_times_are_aware_utc_from_the_database_clock(db_url: str) -> None:
    engine = _time_engine(db_url)
    inserts: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO MT_COLUMNS_TASK"):
            inserts.append(statement)

    try:
        _create(engine, MtColumnsTask)
        event.listen(engine, "before_cursor_execute", record)
        with engine.connect() as conn:
            before = _db_now(conn)
        with Session(engine) as session:
            task = MtColumnsTask(name="t")
            session.add(task)
            session.commit()
            created, updated = task.time_created, task.time_updated
        with engine.connect() as conn:
            after = _db_now(conn)
            raw = conn.scalar(text("SELECT time_created FROM mt_columns_task"))
            if engine.dialect.name == "postgresql":
                kind = conn.scalar(
                    text("SELECT pg_typeof(time_created)::text FROM mt_columns_task")
                )
                assert kind == "timestamp with time zone"
                assert raw.utcoffset() == timedelta(hours=5, minutes=45)  # the session's zone
            elif engine.dialect.name in ("mysql", "mariadb"):
                # DATETIME(6): naive UTC whatever the session's zone, with microseconds.
                assert conn.scalar(text("SELECT @@session.time_zone")) == "+05:45"
                assert isinstance(raw, datetime) and raw.tzinfo is None
                assert before <= raw.replace(tzinfo=timezone.utc) <= after
            else:
                # SQLite: naive UTC text with six fractional digits, as SQLAlchemy writes.
                assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", raw), raw
    finally:
        engine.dispose()

    # The INSERT leaves the times to the database's defaults.
    assert len(inserts) == 1
    columns = re.match(r"\s*INSERT INTO mt_columns_task \(([^)]*)\)", inserts[0], re.I)
    assert columns is not None
    assert "time_created" not in columns.group(1) and "time_updated" not in columns.group(1)

    assert _is_utc(created) and _is_utc(updated)
    assert before <= created <= after
    assert before <= updated <= after
    assert updated >= created


def test_time_updated_changes_on_update(db_url: str) -> None:
    engine = _time_engine(db_url)
    try:
        _create(engine, MtColumnsTask)
        with Session(engine) as session:
            task = MtColumnsTask(name="v1")
            session.add(task)
            session.commit()
            created, first = task.time_created, task.time_updated

            _wait_for_db_clock_after(engine, first)
            task.name = "v2"  # type: ignore[assignment]
            session.commit()
            second = task.time_updated
            assert _is_utc(second)
            assert second > first
            assert task.time_created == created
            with engine.connect() as conn:
                assert second <= _db_now(conn)

            # A Core UPDATE of the table sets it too.
            _wait_for_db_clock_after(engine, second)
            session.execute(update(MtColumnsTask).values(name="v3"))
            session.commit()
            session.expire_all()
            assert task.name == "v3"
            assert task.time_updated > second
            assert task.time_created == created
    finally:
        engine.dispose()


# -- 5. the ready index ---------------------------------------------------------------------------


def test_ready_index_exists_after_create_all(engine: Engine) -> None:
    _create(engine, MtSeedFormTask, MtColumnsTask, MtHTTPFetchTask)
    for table in ("mt_seed_form_task", "mt_columns_task", "mt_http_fetch_task"):
        _assert_ready_index(engine, table)


def _explain(conn: Connection, sql: str, params: Any = None) -> str:
    rows = conn.exec_driver_sql(f"EXPLAIN {sql}", params).scalars().all()
    return "\n".join(rows)


@POSTGRESQL_ONLY
def test_claim_uses_the_ready_index_on_postgresql(engine: Engine) -> None:
    _create(engine, MtColumnsTask)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO mt_columns_task (name, status, time_created, time_updated)"
                " SELECT 'done', 'PROCESSED', now() - make_interval(secs => g), now()"
                " FROM generate_series(1, 20000) AS g"
            )
        )
        conn.execute(
            text("INSERT INTO mt_columns_task (name) SELECT 'ready' FROM generate_series(1, 5)")
        )
        conn.execute(text("ANALYZE mt_columns_task"))

    index = "ix_mt_columns_task_alchq_ready"
    pick = (
        "SELECT id FROM mt_columns_task WHERE status = 'PENDING' ORDER BY time_created, id LIMIT 1"
    )
    with engine.connect() as conn:
        plan = _explain(conn, pick)
    assert index in plan and "Seq Scan" not in plan, plan

    # The statement the worker really runs (with bound parameters).
    claims: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        # The claim, not the rescue's statements: it sets PROCESSING on PENDING rows.
        values = list(parameters.values()) if isinstance(parameters, dict) else []
        sets_processing = isinstance(parameters, dict) and parameters.get("status") == "PROCESSING"
        if "alchq_pick" in statement and sets_processing and "PENDING" in values:
            claims.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        assert worker.process_one(MtColumnsTask, engine=engine) is not None
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert len(claims) == 1
    with engine.connect() as conn:
        plan = _explain(conn, *claims[0])
    assert index in plan and "Seq Scan" not in plan, plan


# -- 6. models that are not tasks -----------------------------------------------------------------


def test_model_without_run_is_refused_before_any_claim(engine: Engine) -> None:
    _create(engine, MtNoRunTask)
    with Session(engine) as session:
        session.add(MtNoRunTask())
        session.commit()

    with pytest.raises(TaskDefinitionError, match="MtNoRunTask") as info:
        worker.process_one(MtNoRunTask, engine=engine)
    assert "run()" in str(info.value)
    with pytest.raises(TaskDefinitionError, match="MtNoRunTask"):
        worker.process_one([MtSeedFormTask, MtNoRunTask], engine=engine)
    with pytest.raises(TaskDefinitionError, match="MtNoRunTask"):
        worker.process_all(MtNoRunTask, engine=engine)

    with Session(engine) as session:
        task = session.scalars(select(MtNoRunTask)).one()
        assert task.status is Status.PENDING
        assert task.alchq_attempts == 0 and task.alchq_worker is None
        with pytest.raises(NotImplementedError, match="MtNoRunTask"):
            task.run()


@pytest.fixture
def unreachable_engine(tmp_path: Path) -> Iterator[Engine]:
    """An engine that cannot connect: errors raised with it come before any query."""
    eng = create_engine(f"sqlite:///{tmp_path / 'no-such-dir' / 'x.sqlite'}")
    yield eng
    eng.dispose()


@pytest.mark.parametrize("not_a_model", [int, object, MtDeclOwner])
def test_process_one_refuses_a_class_that_is_not_a_model(
    not_a_model: Any, unreachable_engine: Engine
) -> None:
    with pytest.raises(TaskDefinitionError, match="is not a BaseQueue model") as info:
        worker.process_one(not_a_model, engine=unreachable_engine)
    assert repr(not_a_model) in str(info.value)
    with pytest.raises(TaskDefinitionError):
        worker.process_one([MtSeedFormTask, not_a_model], engine=unreachable_engine)


@pytest.mark.parametrize(
    "not_a_model", [MtSeedFormTask(name="an instance"), None, 42], ids=["instance", "None", "42"]
)
def test_process_one_refuses_a_non_class(not_a_model: Any, unreachable_engine: Engine) -> None:
    with pytest.raises(TaskDefinitionError):
        worker.process_one(not_a_model, engine=unreachable_engine)


def test_process_one_refuses_a_string_naming_it(unreachable_engine: Engine) -> None:
    with pytest.raises(TaskDefinitionError) as info:
        worker.process_one("MtSeedFormTask", engine=unreachable_engine)  # type: ignore[arg-type]
    assert "MtSeedFormTask" in str(info.value), str(info.value)


def test_abstract_model_is_refused(unreachable_engine: Engine) -> None:
    assert "mt_abstract_task" not in metadata.tables
    with pytest.raises(TaskDefinitionError, match="MtAbstractTask"):
        worker.process_one(MtAbstractTask, engine=unreachable_engine)


def test_model_without_run_is_refused_without_touching_the_database(
    unreachable_engine: Engine,
) -> None:
    with pytest.raises(TaskDefinitionError, match="MtNoRunTask"):
        worker.process_one(MtNoRunTask, engine=unreachable_engine)
    # The engine really is unusable: a valid model fails on the database instead.
    with pytest.raises(Exception) as info:  # noqa: B017 - any database error will do
        worker.process_one(MtSeedFormTask, engine=unreachable_engine)
    assert not isinstance(info.value, TaskDefinitionError)


def test_task_definition_error_is_a_configuration_error() -> None:
    assert issubclass(TaskDefinitionError, alchq.ConfigurationError)
    assert issubclass(TaskDefinitionError, alchq.AlchqError)


# -- 7. Alembic -----------------------------------------------------------------------------------

SEED_FORM_TABLES = {"mt_seed_form_task", "mt_columns_task", "mt_http_fetch_task"}


def _diff_tables(diffs: list[Any]) -> dict[str, list[str]]:
    """Diffs by table name: {table: [op names]}; nested column diffs are flattened."""
    out: dict[str, list[str]] = {}
    for diff in diffs:
        for item in diff if isinstance(diff, list) else [diff]:
            op, rest = item[0], item[1:]
            if op in ("add_table", "remove_table"):
                name = rest[0].name
            elif op in ("add_index", "remove_index"):
                name = rest[0].table.name
            elif op.startswith("modify_") or op in ("add_column", "remove_column"):
                name = rest[1]
            else:  # constraints and the like
                obj = rest[0]
                name = getattr(getattr(obj, "table", None), "name", repr(obj))
            out.setdefault(name, []).append(op)
    return out


def _compare(engine: Engine, target: MetaData) -> dict[str, list[str]]:
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        return _diff_tables(compare_metadata(context, target))


def test_alembic_autogenerate_adds_the_task_tables(engine: Engine) -> None:
    seed = _compare(engine, metadata)
    for table in SEED_FORM_TABLES:
        assert seed[table] == ["add_table", *["add_index"] * 5], (
            table,
            seed[table],
        )

    mixin = _compare(engine, MtDeclBase.metadata)
    assert mixin["mt_decl_task"] == ["add_table", *["add_index"] * 5]
    assert mixin["alchq_workers"] == ["add_table"]  # the worker registry comes along
    assert mixin["mt_decl_owner"] == ["add_table"]
    assert "mt_decl_task" not in seed and "mt_seed_form_task" not in mixin


def test_alembic_sees_no_difference_after_create_all(engine: Engine) -> None:
    _create(engine, MtSeedFormTask, MtColumnsTask, MtHTTPFetchTask)
    MtDeclBase.metadata.create_all(engine)

    seed = _compare(engine, metadata)
    for table in SEED_FORM_TABLES:
        assert table not in seed, (table, seed[table])
    mixin = _compare(engine, MtDeclBase.metadata)
    assert "mt_decl_task" not in mixin and "mt_decl_owner" not in mixin, mixin


def test_alembic_autogenerated_migration_makes_a_working_queue(engine: Engine) -> None:
    """Render the autogenerated migration to Python, run it, and use the table."""
    with engine.begin() as conn:
        context = MigrationContext.configure(
            conn,
            opts={
                "include_name": lambda name, type_, parent: (
                    type_ != "table" or name in ("mt_decl_task", "mt_decl_owner")
                )
            },
        )
        upgrade_ops = produce_migrations(context, MtDeclBase.metadata).upgrade_ops
        assert upgrade_ops is not None
        code = render_python_code(upgrade_ops, migration_context=context)
        # The rendered code names alchq's column type by its module path: a
        # migration file needs ``import alchq`` (as for any custom type).
        assert re.search(r"\balchq\.[\w.]*UTCDateTime\(timezone=True\)", code), code
        namespace: dict[str, Any] = {"op": Operations(context), "sa": __import__("sqlalchemy")}
        namespace["alchq"] = alchq
        namespace["mysql"] = sqlalchemy.dialects.mysql  # unique_key's MySQL variant
        exec(compile("def upgrade():\n" + code, "<migration>", "exec"), namespace)
        namespace["upgrade"]()

    assert _compare(engine, MtDeclBase.metadata) == {}
    _assert_ready_index(engine, "mt_decl_task")
    with pytest.raises(check_refused(engine)), engine.begin() as conn:
        conn.execute(text("INSERT INTO mt_decl_owner (id, runs) VALUES (1, 0)"))
        conn.execute(text("INSERT INTO mt_decl_task (owner_id, status) VALUES (1, 'BOGUS')"))

    with Session(engine) as session:
        owner = MtDeclOwner(runs=0)
        session.add(owner)
        session.flush()
        session.add(MtDeclTask(owner=owner))
        session.commit()
        task = session.scalars(select(MtDeclTask)).one()
        assert task.status is Status.PENDING and _is_utc(task.time_created)
    processed = worker.process_one(MtDeclTask, engine=engine)
    assert processed is not None and processed.status is Status.PROCESSED
    with Session(engine) as session:
        assert session.scalars(select(MtDeclOwner.runs)).one() == 1
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(MtDeclTask)) == 1


# -- 8. DDL for MySQL/MariaDB (compiled only: no server in the test-suite) -------------------------


def _two_task_tables_in_one_base() -> tuple[Table, Table]:
    class Base(DeclarativeBase):  # private: nothing added to shared metadata
        pass

    first = type(
        "MtDdlFirstTask",
        (BaseQueue, Base),
        {"__module__": __name__, "id": mapped_column(Integer, primary_key=True)},
    )
    second = type(
        "MtDdlSecondTask",
        (BaseQueue, Base),
        {"__module__": __name__, "id": mapped_column(Integer, primary_key=True)},
    )
    return _table(first), _table(second)


def _check_names(table: Table) -> set[str]:
    return {str(c.name) for c in table.constraints if isinstance(c, CheckConstraint)}


def test_seed_form_check_constraints_have_per_table_names() -> None:
    assert _check_names(_table(MtSeedFormTask)) == {
        "ck_mt_seed_form_task_alchq_status",
        "ck_mt_seed_form_task_alchq_counters",
    }
    assert _check_names(_table(MtColumnsTask)) == {
        "ck_mt_columns_task_alchq_status",
        "ck_mt_columns_task_alchq_counters",
    }


def test_mixin_form_check_constraint_names_differ_between_task_tables() -> None:
    first, second = _two_task_tables_in_one_base()
    assert _check_names(first).isdisjoint(_check_names(second)), (
        _check_names(first),
        _check_names(second),
    )
    ddl = str(CreateTable(second).compile(dialect=mysql.dialect()))
    assert "CONSTRAINT alchq_status CHECK" not in ddl, ddl


def test_mysql_times_keep_microseconds() -> None:
    ddl = str(CreateTable(_table(MtColumnsTask)).compile(dialect=mysql.dialect()))
    assert "UTC_TIMESTAMP(6)" in ddl
    for column in ("time_created", "time_updated", "alchq_started_at", "alchq_finished_at"):
        assert re.search(rf"\b{column} DATETIME\(6\)", ddl), ddl
