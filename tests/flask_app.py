"""Flask apps for the ``flask ... alchq`` tests, run as subprocesses.

``flask --app tests.flask_app ...`` finds :func:`create_app`, whose command
group comes from the one line ``Alchq(app)``. ``--app tests.flask_app:seed_app``
is the seed's hand-written ``AppGroup`` instead (its ``test_cli`` typo fixed),
and ``--app tests.flask_app:bare_app`` has alchq's commands but no
Flask-SQLAlchemy. The database URL comes from ``$TEST_DATABASE_URL``.
"""

from __future__ import annotations

import os

import click
from flask import Flask, current_app
from flask.cli import AppGroup
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import object_session

from alchq import BaseQueue, Periodic
from alchq.flask import Alchq
from tests.tasks import ran

URL_VARIABLE = "TEST_DATABASE_URL"

db = SQLAlchemy()


class FlaskTask(BaseQueue, db.Model):  # type: ignore[name-defined,misc]
    """Mixin form in the app's ``db.Model``; run() proves it runs in ``db.session``."""

    __tablename__ = "flask_task"

    id = db.Column(db.Integer, primary_key=True)
    note = db.Column(db.String(200))

    def run(self) -> None:
        if object_session(self) is not db.session():
            raise RuntimeError("the worker did not use the app's db.session")
        self.note = f"{current_app.name} pid={os.getpid()}"
        db.session.execute(ran(self.id))


class FlaskPeriodic(BaseQueue, db.Model):  # type: ignore[name-defined,misc]
    """A periodic task of a Flask app: created by the scheduler thread, run in db.session."""

    __tablename__ = "flask_periodic"
    alchq_periodic = [Periodic(every=1, values={"note": "tick"})]

    id = db.Column(db.Integer, primary_key=True)
    note = db.Column(db.String(200))

    def run(self) -> None:
        if object_session(self) is not db.session():
            raise RuntimeError("the worker did not use the app's db.session")
        self.note = "ran"


class FlaskRemover(BaseQueue, db.Model):  # type: ignore[name-defined,misc]
    """run() or error() that call Flask-SQLAlchemy's ``db.session.remove()`` (``mode``)."""

    __tablename__ = "flask_remover"

    id = db.Column(db.Integer, primary_key=True)
    mode = db.Column(db.String(30))
    note = db.Column(db.String(200))

    def run(self) -> None:
        db.session.remove()
        if self.mode == "remove_then_raise":
            raise ValueError("removed its session, then failed")
        if self.mode == "error_removes":
            raise ValueError("fails; its error() removes the session")
        # Goes on with db.session: a new session, whose writes commit with PROCESSED.
        db.session.execute(ran(self.id))

    def error(self, exc: BaseException) -> None:
        db.session.execute(ran(-self.id))
        if self.mode == "error_removes":
            db.session.remove()


def _database_url() -> str:
    url = os.environ.get(URL_VARIABLE)
    if not url:
        raise RuntimeError(f"set {URL_VARIABLE} to the test database's URL")
    return url


def _app_with_db() -> Flask:
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = _database_url()
    db.init_app(app)
    return app


def create_app() -> Flask:
    """The app of ``flask --app tests.flask_app``: alchq's commands in one line."""
    app = _app_with_db()
    Alchq(app)
    return app


def configure_queue_worker(app: Flask) -> None:
    """The seed's hand-written command group, with its typo fixed.

    The seed added ``test_cli`` (undefined) instead of the group it built.
    """
    queue = AppGroup("queue")

    @queue.command("run")
    @click.option("-n", "n", type=int, default=None, help="Process n tasks, then exit.")
    def run(n: int | None) -> None:
        from alchq import worker
        from tests.tasks import CountTask

        if n is None:
            worker.process_forever(CountTask)
        else:
            worker.process_n(CountTask, n)

    app.cli.add_command(queue)


def seed_app() -> Flask:
    """``flask --app tests.flask_app:seed_app queue run [-n N]``."""
    app = _app_with_db()
    configure_queue_worker(app)
    return app


def bare_app() -> Flask:
    """alchq's commands on an app without Flask-SQLAlchemy."""
    app = Flask(__name__)
    Alchq(app)
    return app
