"""Task models for the command-line tests that tests/tasks.py does not have.

They use their own declarative base (the mixin form), so importing this module
adds nothing to ``alchq.metadata``: other tests' ``metadata.create_all()``
stays unaffected.
"""

from __future__ import annotations

from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alchq import BaseQueue


class Base(DeclarativeBase):
    pass


class NoRunTask(BaseQueue, Base):
    """A task model that forgot to define run(): the CLI must refuse it."""

    __tablename__ = "no_run_task"

    id: Mapped[int] = mapped_column(primary_key=True)


not_a_class = 42
