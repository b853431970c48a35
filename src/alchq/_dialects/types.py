"""Column types whose storage differs between databases."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import DateTime, Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

#: Databases whose DATETIME column has no time zone: alchq stores naive UTC there.
_NAIVE_STORAGE = frozenset({"sqlite", "mysql", "mariadb"})


class UTCDateTime(TypeDecorator[datetime]):  # exported as alchq.UTCDateTime
    """A timestamp that is always a timezone-aware UTC ``datetime`` in Python.

    PostgreSQL stores ``timestamptz``; SQLite and MySQL store naive UTC. A
    naive ``datetime`` given by the app is taken to be UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            # Microseconds, like the other databases: plain DATETIME keeps whole
            # seconds, which would make "oldest first" a per-second order.
            from sqlalchemy.dialects.mysql import DATETIME

            return dialect.type_descriptor(DATETIME(fsp=6))
        return dialect.type_descriptor(self.impl)

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        value = value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value
        value = value.astimezone(timezone.utc)
        if dialect.name in _NAIVE_STORAGE:
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):  # pragma: no cover - driver oddity
            raise TypeError(f"expected a datetime from the database, got {value!r}")
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


# Alembic writes a column's type as ``<module>.<name>`` into migrations: make
# that the public, stable ``alchq.UTCDateTime``.
UTCDateTime.__module__ = "alchq"


def key_string(length: int) -> TypeEngine[str]:
    """A key compared exactly, as on PostgreSQL and SQLite: MySQL's default
    collations would take ``"Report"`` and ``"report"`` for one key."""
    from sqlalchemy import String
    from sqlalchemy.dialects.mysql import VARCHAR

    exact = VARCHAR(length, collation="utf8mb4_bin")
    return String(length).with_variant(exact, "mysql", "mariadb")


def sized_for_mysql(type_: TypeEngine[Any]) -> TypeEngine[Any]:
    """``type_``, made creatable on MySQL/MariaDB if it is a ``String`` without a
    length (``db.String()``, as in the seed's example), which those databases
    refuse as a VARCHAR: TEXT there, unchanged elsewhere."""
    from sqlalchemy import Enum, String, Text

    if (
        not isinstance(type_, String)
        or isinstance(type_, (Text, Enum))
        or type_.length is not None
        or any(name in type_._variant_mapping for name in ("mysql", "mariadb"))  # noqa: SLF001
    ):
        return type_
    return type_.with_variant(Text(), "mysql", "mariadb")
