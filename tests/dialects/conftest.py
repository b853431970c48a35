"""The database contract suite runs on every database, MariaDB included."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import database_url


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of an empty database, once per supported database."""
    return database_url(request, tmp_path)


#: What MariaDB does not pass yet (issue 12), each marked a strict expected failure:
#: it must fail as long as it is listed, so a fix shows up as a failure to unlist.
MARIADB_NOT_YET: dict[str, str] = {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        name = getattr(item, "originalname", item.name)
        if "[mariadb" in item.name and name in MARIADB_NOT_YET:
            item.add_marker(pytest.mark.xfail(reason=MARIADB_NOT_YET[name], strict=True))
