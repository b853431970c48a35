"""The only place that knows PostgreSQL, SQLite and MariaDB/MySQL differ.

Everything else in alchq asks :func:`dialect_for` for a :class:`Dialect` and
uses its capability flags and methods; nothing else branches on the database.
``base.py`` is the generic implementation (a leaf: it imports no other
dialect); each database's module refines it, and :data:`DIALECTS` below is the
one map from SQLAlchemy's dialect name to alchq's class.
"""

from __future__ import annotations

from sqlalchemy import Engine

from alchq._dialects.base import (
    Claim,
    ClaimPlan,
    Dialect,
    FinishPlan,
    ReadyIndexKwargs,
    UniqueKey,
    claim_sort_key,
    exact,
    reached,
    ready_index_kwargs,
    utc_now,
)
from alchq._dialects.mysql import MariaDBDialect, MySQLDialect, is_mariadb
from alchq._dialects.postgresql import PostgreSQLDialect
from alchq._dialects.sqlite import SQLiteDialect

__all__ = [
    "DIALECTS",
    "Claim",
    "ClaimPlan",
    "FinishPlan",
    "Dialect",
    "ReadyIndexKwargs",
    "UniqueKey",
    "claim_sort_key",
    "dialect_for",
    "exact",
    "reached",
    "ready_index_kwargs",
    "utc_now",
]

#: SQLAlchemy dialect name -> alchq's dialect class; any other database gets the
#: generic :class:`Dialect`.
DIALECTS: dict[str, type[Dialect]] = {
    "postgresql": PostgreSQLDialect,
    "sqlite": SQLiteDialect,
    "mysql": MySQLDialect,
    "mariadb": MariaDBDialect,
}


def dialect_for(engine: Engine) -> Dialect:
    """The :class:`Dialect` for an engine, chosen from its dialect name."""
    name = "mariadb" if is_mariadb(engine.dialect) else engine.dialect.name
    return DIALECTS.get(name, Dialect)()
