"""Migrations made by autogenerate: portable across databases, complete, and adopting tables.

The migrations are made and run the way an app does: ``flask db init / migrate
/ upgrade`` (Flask-Migrate's stock template) and ``alembic init / revision
--autogenerate / upgrade`` (Alembic's), as subprocesses, on real SQLite files
and real PostgreSQL databases. ``tests/migrate_app.py`` is the app.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import produce_migrations, render_python_code
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy import (
    Engine,
    String,
    create_engine,
    inspect,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alchq import BaseQueue, worker
from alchq.alembic import AdoptTableOp, adopt_table, drop_queue_schema
from tests.conftest import _fresh_pg_database, worker_env
from tests.support import check_refused

APP = "tests.migrate_app"


def _run(
    cwd: Path, command: list[str], env: dict[str, str], check: bool
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", *command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    return done


def _flask(
    cwd: Path, url: str, *args: str, stage: int = 2, check: bool = True, batch: bool = False
) -> subprocess.CompletedProcess[str]:
    env = worker_env()
    env["TEST_DATABASE_URL"] = url
    env["MIGRATE_APP_STAGE"] = str(stage)
    env["MIGRATE_APP_BATCH"] = "1" if batch else "0"
    return _run(cwd, ["flask", "--app", APP, *args], env, check)


def _alembic(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(cwd, ["alembic", *args], worker_env(), check)


def _url(kind: str, tmp_path: Path, pg_base_url: str | None, name: str) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / name}.sqlite"
    if pg_base_url is None:
        pytest.skip("PostgreSQL is not available")
    return _fresh_pg_database(pg_base_url)


def _versions(directory: Path) -> list[str]:
    return sorted(p.read_text() for p in directory.glob("*.py"))


def _statuses(url: str, table: str) -> dict[int, tuple[str, Any]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text(f"SELECT id, status, filename FROM {table} ORDER BY id"))
            return {row[0]: (row[1], row[2]) for row in rows}
    finally:
        engine.dispose()


def _execute(url: str, *statements: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(text(statement))
    finally:
        engine.dispose()


def _rejects(url: str, statement: str) -> None:
    with pytest.raises(check_refused(url)):
        _execute(url, statement)


BOGUS_REPORT = "INSERT INTO report (id, status) VALUES (99, 'BOGUS')"


NO_CHANGES = "No changes in schema detected"


@pytest.mark.parametrize(
    ("made_on", "run_on"), [("sqlite", "postgresql"), ("postgresql", "sqlite")]
)
def test_flask_migrate_migration_made_on_one_database_upgrades_the_other(
    made_on: str, run_on: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    base = request.getfixturevalue("pg_base_url")
    source = _url(made_on, tmp_path, base, "source")
    target = _url(run_on, tmp_path, base, "target")
    _flask(tmp_path, source, "db", "init", "-d", "migrations")
    _flask(tmp_path, source, "db", "migrate", "-d", "migrations", "-m", "tasks")
    (migration,) = _versions(tmp_path / "migrations" / "versions")
    # Portable constructs, and the import they need, written by alchq's plugin.
    assert "import alchq\n" in migration
    assert "server_default=alchq.utc_now()" in migration
    assert "strftime" not in migration and "now()" not in migration.replace("utc_now()", "")

    for url in (source, target):
        _flask(tmp_path, url, "db", "upgrade", "-d", "migrations")
        again = _flask(tmp_path, url, "db", "migrate", "-d", "migrations", "-m", "again")
        assert NO_CHANGES in again.stdout + again.stderr, again.stderr
        assert len(_versions(tmp_path / "migrations" / "versions")) == 1
        _rejects(url, BOGUS_REPORT)

    # The upgraded database is a working queue: a task enqueued there runs.
    _execute(
        target,
        "INSERT INTO user_account (id, email) VALUES (1, 'a@example.com')",
        "INSERT INTO export (id, user_id) VALUES (1, 1)",
    )
    _flask(tmp_path, target, "alchq", "run", f"{APP}:Export", "--burst")
    assert _statuses(target, "export") == {1: ("PROCESSED", "export-1-of-a@example.com.csv")}


def test_stock_alembic_template_migration_runs_without_edits(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """``alembic init``'s env.py, given only the app's metadata and URL (as every app does)."""
    base = request.getfixturevalue("pg_base_url")
    source = _url("sqlite", tmp_path, base, "source")
    target = _url("postgresql", tmp_path, base, "target")
    _alembic(tmp_path, "init", "migrations")
    env_py = tmp_path / "migrations" / "env.py"
    env_py.write_text(
        env_py.read_text().replace(
            "target_metadata = None",
            "from tests.migrate_app import db\ntarget_metadata = db.metadata",
        )
    )
    ini = tmp_path / "alembic.ini"
    template = ini.read_text()

    def use(url: str) -> None:
        ini.write_text(re.sub(r"(?m)^sqlalchemy\.url = .*$", f"sqlalchemy.url = {url}", template))

    use(source)
    _alembic(tmp_path, "revision", "--autogenerate", "-m", "tasks")
    (migration,) = _versions(tmp_path / "migrations" / "versions")
    assert "import alchq\n" in migration and "strftime" not in migration
    for url in (source, target):
        use(url)
        _alembic(tmp_path, "upgrade", "head")
        _alembic(tmp_path, "check")  # "No new upgrade operations detected."
        _rejects(url, BOGUS_REPORT)


@pytest.mark.parametrize("batch", [False, True], ids=["plain", "render_as_batch"])
def test_adopting_a_table_that_holds_rows(db_url: str, tmp_path: Path, batch: bool) -> None:
    """The app's ``export`` table, with old rows, becomes an alchq task table.

    Also with ``Migrate(app, db, render_as_batch=True)``, as SQLite apps often have it.
    """

    def flask(*args: str, stage: int = 2) -> subprocess.CompletedProcess[str]:
        return _flask(tmp_path, db_url, *args, stage=stage, batch=batch)

    flask("db", "init", "-d", "m", stage=1)
    flask("db", "migrate", "-d", "m", "-m", "plain", stage=1)
    flask("db", "upgrade", "-d", "m", stage=1)
    _execute(
        db_url,
        "INSERT INTO user_account (id, email) VALUES (1, 'a@example.com')",
        "INSERT INTO export (id, user_id, filename) VALUES (1, 1, 'old-1.csv')",
        "INSERT INTO export (id, user_id, filename) VALUES (2, 1, 'old-2.csv')",
    )

    flask("db", "migrate", "-d", "m", "-m", "adopt")
    migration = next(v for v in _versions(tmp_path / "m" / "versions") if "adopt_table" in v)
    assert "import alchq.alembic\n" in migration
    assert "alchq.alembic.adopt_table('export')" in migration
    assert "alchq.alembic.drop_queue_schema('export')" in migration
    assert "add_column('status'" not in migration and "ix_export_alchq" not in migration
    flask("db", "upgrade", "-d", "m")

    # Old work is finished, not run again; the constraints hold; new work runs.
    assert _statuses(db_url, "export") == {
        1: ("PROCESSED", "old-1.csv"),
        2: ("PROCESSED", "old-2.csv"),
    }
    _rejects(db_url, "UPDATE export SET status = 'BOGUS'")
    _execute(db_url, "INSERT INTO export (id, user_id) VALUES (3, 1)")
    flask("alchq", "run", f"{APP}:Export", "--burst")
    assert _statuses(db_url, "export") == {
        1: ("PROCESSED", "old-1.csv"),
        2: ("PROCESSED", "old-2.csv"),
        3: ("PROCESSED", "export-3-of-a@example.com.csv"),
    }
    again = flask("db", "migrate", "-d", "m", "-m", "again")
    assert NO_CHANGES in again.stdout + again.stderr, again.stderr
    # Adopted rows age for pruning from their adoption, not from their creation.
    flask("alchq", "prune", f"{APP}:Export", "--older-than", "1h")
    assert set(_statuses(db_url, "export")) == {1, 2, 3}

    # And back: the downgrade takes alchq's columns off, keeping the rows.
    flask("db", "downgrade", "-d", "m", stage=1)
    engine = create_engine(db_url)
    try:
        columns = {c["name"] for c in inspect(engine).get_columns("export")}
        indexes = {ix["name"] for ix in inspect(engine).get_indexes("export")}
    finally:
        engine.dispose()
    assert columns == {"id", "user_id", "filename"}
    assert not [name for name in indexes if name and "alchq" in name]


# -- adopt_table by hand, and the plugin left out ----------------------------------------


class _Base(DeclarativeBase):
    pass


class LegacyJob(BaseQueue, _Base):
    __tablename__ = "legacy_job"

    id: Mapped[int] = mapped_column(primary_key=True)
    payload: Mapped[str | None] = mapped_column(String(50))

    def run(self) -> None:
        self.payload = f"done {self.payload}"


def _legacy(engine: Engine, *rows: str) -> None:
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE legacy_job (id INTEGER PRIMARY KEY, payload VARCHAR(50))"))
        for n, payload in enumerate(rows, 1):
            conn.execute(text(f"INSERT INTO legacy_job (id, payload) VALUES ({n}, '{payload}')"))


def _migrate(engine: Engine, step: Any) -> None:
    with engine.begin() as conn, Operations.context(MigrationContext.configure(conn)):
        step()


def test_adopt_table_by_hand_can_make_old_rows_pending(engine: Engine) -> None:
    _legacy(engine, "a", "b")
    _migrate(engine, lambda: adopt_table("legacy_job", existing="PENDING"))
    assert worker.process_all(LegacyJob, engine=engine) == 2
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT payload, status FROM legacy_job ORDER BY id")).all()
    assert [tuple(r) for r in rows] == [("done a", "PROCESSED"), ("done b", "PROCESSED")]

    _migrate(engine, lambda: drop_queue_schema("legacy_job"))
    assert {c["name"] for c in inspect(engine).get_columns("legacy_job")} == {"id", "payload"}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: adopt_table("legacy_job", existing="BOGUS"), "existing must be one of"),
        (lambda: adopt_table("legacy_job", existing="PROCESSING"), "existing must be one of"),
        (lambda: adopt_table("no_such_table"), "there is no table 'no_such_table'"),
    ],
)
def test_adopt_table_refuses_bad_arguments(engine: Engine, call: Any, message: str) -> None:
    _legacy(engine, "a")
    with pytest.raises(ValueError, match=message):
        _migrate(engine, call)
    assert {c["name"] for c in inspect(engine).get_columns("legacy_job")} == {"id", "payload"}


def test_adopt_table_refuses_a_table_with_a_column_of_alchqs_name(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE legacy_job (id INTEGER PRIMARY KEY, status VARCHAR(20))"))
    with pytest.raises(ValueError, match=r"already has column\(s\) 'status'.*rename"):
        _migrate(engine, lambda: adopt_table("legacy_job"))


def _upgrade_ops(engine: Engine, **opts: Any) -> Any:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"target_metadata": _Base.metadata, **opts})
        upgrade_ops = produce_migrations(context, _Base.metadata).upgrade_ops
        assert upgrade_ops is not None
        return upgrade_ops, render_python_code(upgrade_ops, migration_context=context)


def test_plugin_adopts_by_default_and_can_be_left_out(engine: Engine) -> None:
    _legacy(engine, "a")
    ops, code = _upgrade_ops(engine)
    assert AdoptTableOp in [type(o) for o in ops.ops], code
    assert "alchq.alembic.adopt_table('legacy_job')" in code
    assert not re.search(r"add_column\(.*'status'", code)

    ops, code = _upgrade_ops(engine, autogenerate_plugins=["alembic.autogenerate.*", "~alchq"])
    assert AdoptTableOp not in [type(o) for o in ops.ops]
    assert re.search(r"add_column\(.*'status'", code), code


def test_plugin_answers_to_its_short_name(engine: Engine) -> None:
    _legacy(engine, "a")
    ops, code = _upgrade_ops(engine, autogenerate_plugins=["alembic.autogenerate.*", "alchq"])
    assert [type(o) for o in ops.ops].count(AdoptTableOp) == 1, code


def test_the_package_declares_the_plugin() -> None:
    from importlib.metadata import entry_points

    (plugin,) = [e for e in entry_points(group="alembic.plugins") if e.value.startswith("alchq")]
    assert plugin.name.startswith("alembic.autogenerate.")  # matched by Alembic's default list


def test_a_table_with_a_column_of_alchqs_name_is_adopted_and_told_to_rename(
    engine: Engine,
) -> None:
    """Autogenerate still writes adopt_table (not half of alchq's schema); it says what to do."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE legacy_job (id INTEGER PRIMARY KEY, payload VARCHAR(50),"
                " status VARCHAR(20))"
            )
        )
    ops, code = _upgrade_ops(engine)
    assert AdoptTableOp in [type(o) for o in ops.ops], code
    assert not re.search(r"add_column\(.*'alchq_attempts'", code)
    with pytest.raises(ValueError, match=r"already has column\(s\) 'status'"):
        _migrate(engine, lambda: adopt_table("legacy_job"))
