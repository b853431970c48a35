"""The only place that knows PostgreSQL, SQLite and MariaDB/MySQL differ.

Everything else in alchq asks :func:`dialect_for` for a :class:`Dialect` and
uses its capability flags and methods; nothing else branches on the database.
"""

from __future__ import annotations

from alchq._dialects.base import Dialect, ReadyIndexKwargs, dialect_for, utc_now

__all__ = ["Dialect", "ReadyIndexKwargs", "dialect_for", "utc_now"]
