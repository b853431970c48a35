"""The database contract suite runs on every database, MariaDB included."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import fresh_mariadb_database


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of an empty database, once per supported database."""
    if request.param == "mariadb":
        return fresh_mariadb_database(request)
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'queue.sqlite'}"
    base = request.getfixturevalue("pg_base_url")
    if base is None:
        pytest.skip("PostgreSQL is not available")
    from tests.conftest import _fresh_pg_database

    return _fresh_pg_database(base)


#: What MariaDB does not pass yet (issue 12), each marked a strict expected failure:
#: it must fail as long as it is listed, so a fix shows up as a failure to unlist.
MARIADB_NOT_YET = {
    "test_insert_unless_conflict_inserts_a_key_once_while_it_is_active": (
        "unique enqueue needs another design without partial unique indexes"
    ),
    "test_insert_unless_conflict_fails_on_other_constraints": (
        "unique enqueue needs another design without partial unique indexes"
    ),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        name = getattr(item, "originalname", item.name)
        if "[mariadb" in item.name and name in MARIADB_NOT_YET:
            item.add_marker(pytest.mark.xfail(reason=MARIADB_NOT_YET[name], strict=True))
