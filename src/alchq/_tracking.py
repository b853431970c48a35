"""What a run sends through its task's own database connection.

A lost connection takes the uncommitted writes of its transaction with it:
whether run() wrote through the task's session decides whether an outcome
the database was away for can still be recorded, or the task must run again.
Writes run() commits on connections of its own are not counted here.

One ``before_cursor_execute`` listener per engine (installed by the worker)
feeds the :class:`RunWatch` of the run in progress in this context, if any;
outside a run it does nothing.
"""

from __future__ import annotations

from contextvars import ContextVar
from types import TracebackType
from typing import Any

from sqlalchemy import Engine, event

_current: ContextVar[RunWatch | None] = ContextVar("alchq_run_watch", default=None)


class RunWatch:
    """Notes the statements of one run on one DB-API connection (a context manager)."""

    def __init__(self, dbapi_connection: Any) -> None:
        self.dbapi_connection = dbapi_connection
        self.writes = False
        self._token: Any = None

    def __enter__(self) -> RunWatch:
        self._token = _current.set(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _current.reset(self._token)


def _note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
    watch = _current.get()
    if (
        watch is not None
        and conn.connection.dbapi_connection is watch.dbapi_connection
        and not statement.lstrip()[:6].upper().startswith(("SELECT", "WITH"))
    ):
        watch.writes = True


def install(engine: Engine) -> None:
    """Watch ``engine``'s statements (once per engine)."""
    if not event.contains(engine, "before_cursor_execute", _note):
        event.listen(engine, "before_cursor_execute", _note)
