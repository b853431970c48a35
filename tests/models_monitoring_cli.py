"""Task models for the monitoring command tests (tests/test_cli_monitoring.py).

Their own declarative base, like tests/models_cli.py: importing this module adds
nothing to ``alchq.metadata``.
"""

from __future__ import annotations

import time

from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alchq import BaseQueue


class Base(DeclarativeBase):
    pass


class MonTask(BaseQueue, Base):
    """``note``: "fail" raises, "slow" runs for 30 s, anything else succeeds."""

    __tablename__ = "mon_task"

    id: Mapped[int] = mapped_column(primary_key=True)
    note: Mapped[str | None] = mapped_column(String(50), nullable=True)

    def run(self) -> None:
        if self.note == "fail":
            raise ValueError("failed on purpose")
        if self.note == "slow":
            time.sleep(30)  # the tests stop it (cancel, kill) long before


class OtherTask(BaseQueue, Base):
    """A second model in the same database."""

    __tablename__ = "other_task"

    id: Mapped[int] = mapped_column(primary_key=True)

    def run(self) -> None:
        pass
