"""The seed's demo model (SEED.md, "### demo") in the mixin form.

That is ``class MyTask(BaseQueue, db.Model)``: its table is in ``db.metadata``.
The class body is the seed's, verbatim (only normalized by ruff format); the
class is named ``SeedMixinTask`` because class and table names must be unique
in the test session, and ``MyTask`` is bound to it below so that the body's own
reference to ``MyTask`` (in ``error()``) works unchanged. PostgreSQL only
(``gen_random_uuid()``). The imports are the ones the demo leaves out.
"""

# mypy: disable-error-code="no-untyped-def"
from sqlalchemy import text
from sqlalchemy.dialects.postgresql import UUID

from alchq import BaseQueue
from tests.models_seed_app import db


class SeedMixinTask(BaseQueue, db.Model):  # type: ignore[name-defined, misc]
    """A task."""

    id = db.Column(UUID(as_uuid=True), primary_key=True, server_default=text("gen_random_uuid()"))
    operation = db.Column(db.String())
    retries = db.Column(db.Integer(), default=0)

    # time_created: added by BaseQueue
    # time_updated: added by BaseQueue
    # status: added by BaseQueue

    def run(self):
        """Run when the next task is available."""
        if self.operation == "hop":
            print("Hippity-hop!")
        elif self.operation == "skip":
            print("Skipped a beat!")
        elif self.operation == "jump":
            print("Jumped 3 feet!")
        else:
            raise ValueError("Operation wasn't hop, skip, or jump!")

    def error(self, exc):
        """Runs if the task fails for any reason."""
        from flask import current_app as app

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


MyTask = SeedMixinTask
