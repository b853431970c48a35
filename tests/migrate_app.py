"""A Flask-SQLAlchemy + Flask-Migrate app for the migration tests (tests/test_migrations.py).

It is the app the adoption issue was found with: an ``export`` job table that
the app had before alchq. ``$MIGRATE_APP_STAGE`` picks the model's version:
``1`` is the plain table (as an RQ app has it), ``2`` (the default) makes it
an alchq task. The database URL comes from ``$TEST_DATABASE_URL``.
"""

from __future__ import annotations

import os

from flask import Flask
from flask_migrate import Migrate  # type: ignore[import-untyped]
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapped, mapped_column, relationship

from alchq import BaseQueue
from alchq.flask import Alchq

STAGE = int(os.environ.get("MIGRATE_APP_STAGE", "2"))

db = SQLAlchemy()
migrate = Migrate()


class User(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "user_account"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(db.String(200))


if STAGE == 1:

    class Export(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "export"

        id: Mapped[int] = mapped_column(primary_key=True)
        user_id: Mapped[int] = mapped_column(db.ForeignKey("user_account.id"))
        filename: Mapped[str | None] = mapped_column(db.String(200))

else:

    class Export(BaseQueue, db.Model):  # type: ignore[name-defined,misc,no-redef]
        __tablename__ = "export"

        id: Mapped[int] = mapped_column(primary_key=True)
        user_id: Mapped[int] = mapped_column(db.ForeignKey("user_account.id"))
        filename: Mapped[str | None] = mapped_column(db.String(200))
        user = relationship(User)

        def run(self) -> None:
            self.filename = f"export-{self.id}-of-{self.user.email}.csv"

    class Report(BaseQueue, db.Model):  # type: ignore[name-defined,misc]
        """A task table that is new in stage 2: created, not adopted."""

        __tablename__ = "report"

        id: Mapped[int] = mapped_column(primary_key=True)
        title: Mapped[str | None] = mapped_column(db.String(200))

        def run(self) -> None:
            self.title = f"report {self.id}"


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["TEST_DATABASE_URL"]
    db.init_app(app)
    # As many SQLite apps do; MIGRATE_APP_BATCH=0 for Flask-Migrate's default.
    migrate.init_app(app, db, render_as_batch=os.environ.get("MIGRATE_APP_BATCH") == "1")
    Alchq(app)
    return app
