"""A Flask app with the alchq dashboard, and its task models, for the dashboard tests.

The models use their own declarative base (the mixin form), so importing this
module adds nothing to ``alchq.metadata``. A worker runs them with
``alchq run tests.dashboard_app:ProgressTask --url URL``; the app reads them
through Flask-SQLAlchemy's ``db.session`` (its default engine serves every mapper).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import Engine, String, create_engine, insert
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alchq import BaseQueue
from alchq._commands import create_tables
from alchq.dashboard import Dashboard
from alchq.flask import Alchq

#: The dashboard tests' secret: a test value, never a real one.
TEST_SECRET = "dashboard-tests-only"

#: Steps and pause of ProgressTask: long enough for a page to see two values.
PROGRESS_STEPS = 24
PROGRESS_PAUSE = 0.25

db = SQLAlchemy()


class Base(DeclarativeBase):
    pass


class DashTask(BaseQueue, Base):
    """A task with a text column (``note``) and a secret one (``api_key``)."""

    __tablename__ = "dash_task"

    id: Mapped[int] = mapped_column(primary_key=True)
    note: Mapped[str | None] = mapped_column(String(200))
    api_key: Mapped[str | None] = mapped_column(String(200))

    def run(self) -> None:
        if self.note == "fail":
            raise ValueError("asked to fail")


class OtherTask(BaseQueue, Base):
    """A second model: the overview shows both, filters keep them apart."""

    __tablename__ = "dash_other_task"

    id: Mapped[int] = mapped_column(primary_key=True)
    payload: Mapped[str | None] = mapped_column(String(200))

    def run(self) -> None:
        pass


class ProgressTask(BaseQueue, Base):
    """Reports its progress every step: the page must show it advance while it runs."""

    __tablename__ = "dash_progress_task"

    id: Mapped[int] = mapped_column(primary_key=True)

    def run(self) -> None:
        for i in range(PROGRESS_STEPS):
            self.alchq_progress(i / PROGRESS_STEPS, f"step {i} of {PROGRESS_STEPS}")
            time.sleep(PROGRESS_PAUSE)
        self.alchq_progress(1.0, "done")


MODELS: list[type[BaseQueue]] = [DashTask, OtherTask, ProgressTask]


def create_app(url: str, *, secret: str | None = TEST_SECRET, **dashboard: Any) -> Flask:
    """The app: ``db`` on ``url``, the dashboard mounted by ``Alchq(app, dashboard=...)``.

    ``dashboard`` are Dashboard's keyword arguments (models default to MODELS).
    """
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = url
    if secret is not None:
        app.config["SECRET_KEY"] = secret
    db.init_app(app)
    dashboard.setdefault("models", MODELS)
    Alchq(app, dashboard=Dashboard(**dashboard))
    return app


def dispose(app: Flask) -> None:
    """Close the app's engines' connections (Flask-SQLAlchemy keeps them pooled)."""
    with app.app_context():
        for engine in db.engines.values():
            engine.dispose()


@contextmanager
def database(url: str) -> Iterator[Engine]:
    """An engine on ``url`` with the models' tables (and alchq's registry) created."""
    engine = create_engine(url)
    try:
        create_tables(MODELS, engine)
        yield engine
    finally:
        engine.dispose()


def add_rows(engine: Engine, model: type[BaseQueue], rows: list[dict[str, Any]]) -> None:
    """Insert tasks as they are, statuses and error fields included (no worker needed)."""
    table: Any = model.__table__  # type: ignore[attr-defined]
    with engine.begin() as conn:
        for row in rows:  # one by one: rows may set different columns
            conn.execute(insert(table).values(**row))
