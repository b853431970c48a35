"""``alchq demo``: the seed's hop/skip/jump demo, on a SQLite file, through a real worker.

The model below is the seed's, with two changes for SQLite: the id is a UUID
made in Python (SQLite has no gen_random_uuid()), and a "wobble" operation
fails once with a ConnectionError so that error()'s retry-by-new-row runs.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from typing import Any

try:
    from flask import Flask, current_app
    from flask_sqlalchemy import SQLAlchemy
except ImportError as exc:  # pragma: no cover - depends on the install
    raise SystemExit(
        "alchq demo needs Flask and Flask-SQLAlchemy: pip install 'alchq[flask]'"
    ) from exc

from sqlalchemy import select

import alchq
from alchq import BaseQueue, Status, worker

db = SQLAlchemy()


class MyTask(BaseQueue):
    """A task."""

    id = db.Column(db.Uuid(), primary_key=True, default=uuid.uuid4)
    operation = db.Column(db.String())
    retries = db.Column(db.Integer(), default=0)

    def run(self) -> None:
        """Run when the next task is available."""
        if self.operation == "hop":
            print("Hippity-hop!")
        elif self.operation == "skip":
            print("Skipped a beat!")
        elif self.operation == "jump":
            print("Jumped 3 feet!")
        elif self.operation == "wobble":
            if self.retries == 0:
                raise ConnectionError("The trampoline wobbled!")
            print("Wobbled, then landed!")
        else:
            raise ValueError("Operation wasn't hop, skip, or jump!")

    def error(self, exc: BaseException) -> None:
        """Runs if the task fails for any reason."""
        app: Any = current_app
        if isinstance(exc, ValueError):
            app.logger.error("I found a ValueError!")
        elif self.retries < 3:
            # create a whole new entry
            # this way the data that failed sticks around
            retry = MyTask(operation=self.operation, retries=self.retries + 1)
            db.session.add(retry)
            db.session.commit()
        else:
            app.logger.error("Max retries exceeded.")


def create_app(path: str) -> Flask:
    app = Flask("alchq_demo")
    app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite:///" + os.path.abspath(path)
    db.init_app(app)
    return app


def main(path: str = "alchq-demo.sqlite") -> None:
    logging.basicConfig(
        level=logging.INFO, format="  [log] %(name)s: %(message)s", stream=sys.stdout
    )
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    app = create_app(path)
    with app.app_context():
        print(f"1. Creating the task table in {path}")
        alchq.metadata.create_all(db.engine)

        print("2. Queueing: hop, skip, jump, fly (fails), wobble (fails once, retried by error())")
        for op in ["hop", "skip", "jump", "fly", "wobble"]:
            db.session.add(MyTask(operation=op))
            db.session.commit()

        print("3. Running a worker until the queue is empty (worker.process_all(MyTask))")
        processed = worker.process_all(MyTask)
        sys.stdout.flush()

        print(f"4. The worker processed {processed} tasks. The table now holds:")
        rows = db.session.scalars(select(MyTask).order_by(MyTask.time_created)).all()
        print(f"   {'operation':<10} {'retries':<8} {'status':<10} error")
        for t in rows:
            err = f"{t.alchq_error_type}: {t.alchq_error_message}" if t.alchq_error_type else ""
            print(f"   {t.operation:<10} {t.retries:<8} {t.status.value:<10} {err}")
        counts = {s.value: sum(1 for t in rows if t.status == s) for s in Status}
        print("   " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
