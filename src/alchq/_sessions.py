"""Find the session a worker should use: a factory, an engine, or Flask-SQLAlchemy's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from alchq.exceptions import NoDatabaseError

NO_DATABASE = (
    "alchq's worker needs a database: pass session_factory=sessionmaker(engine) or "
    "engine=create_engine(url), or call it inside a Flask app context with Flask-SQLAlchemy"
)


@dataclass
class SessionSource:
    """Where task sessions come from.

    ``scoped`` sources (Flask-SQLAlchemy's ``db.session``) hand out the
    context's one session, so that ``db.session`` inside ``run()`` *is* the
    task's session; other sources make a new session per task.
    """

    factory: Callable[[], Session]
    scoped: scoped_session[Any] | None = None
    app_config: dict[str, Any] | None = None

    def open(self) -> Session:
        if self.scoped is not None:
            session: Session = self.scoped()
            return session
        return self.factory()

    def release(self, session: Session) -> None:
        """End a task's session so a long-running worker's identity map stays empty."""
        if self.scoped is not None:
            self.scoped.remove()
        else:
            session.close()


def flask_app() -> Any:
    """The current Flask app (the real object, not Flask's proxy), or None outside one."""
    try:
        from flask import current_app, has_app_context
    except ImportError:
        return None
    if not has_app_context():
        return None
    # The object behind the proxy: its context can be entered from other threads.
    return current_app._get_current_object()  # type: ignore[attr-defined]  # noqa: SLF001


def flask_db(app: Any) -> Any:
    """The app's Flask-SQLAlchemy extension (its ``db``), or None (also without an app)."""
    return None if app is None else app.extensions.get("sqlalchemy")


def _flask_source() -> SessionSource | None:
    app = flask_app()
    if app is None:
        return None
    db = flask_db(app)
    if db is None:
        raise NoDatabaseError(
            "inside a Flask app but Flask-SQLAlchemy is not set up on it "
            "(no app.extensions['sqlalchemy']); " + NO_DATABASE
        )
    return from_object(db)


def _app_config() -> dict[str, Any] | None:
    """The current Flask app's config, for ``ALCHQ_*`` settings, if in an app context."""
    app = flask_app()
    return dict(app.config) if app is not None else None


def from_object(obj: Any) -> SessionSource:
    """Build a source from an Engine, sessionmaker, scoped_session, Flask-SQLAlchemy or callable."""
    if isinstance(obj, Engine):
        # Not expiring on commit lets process_one() return a task that can be
        # read after its session has closed.
        return SessionSource(sessionmaker(obj, expire_on_commit=False))
    if isinstance(obj, scoped_session):
        return SessionSource(obj, scoped=obj)
    if isinstance(obj, sessionmaker):
        maker: sessionmaker[Session] = obj
        return SessionSource(lambda: maker(expire_on_commit=False))
    session = getattr(obj, "session", None)
    if isinstance(session, scoped_session):  # a Flask-SQLAlchemy ``db``
        return SessionSource(session, scoped=session)
    if callable(obj):
        return SessionSource(obj)
    raise NoDatabaseError(f"cannot make sessions from {obj!r}; " + NO_DATABASE)


def resolve(session_factory: Any = None, engine: Engine | None = None) -> SessionSource:
    """The explicit argument if any, else Flask-SQLAlchemy's session, else a clear error."""
    if session_factory is not None and engine is not None:
        raise NoDatabaseError("pass session_factory= or engine=, not both")
    if session_factory is not None:
        source = from_object(session_factory)
    elif engine is not None:
        source = from_object(engine)
    else:
        found = _flask_source()
        if found is None:
            raise NoDatabaseError(NO_DATABASE)
        source = found
    source.app_config = _app_config()
    return source
