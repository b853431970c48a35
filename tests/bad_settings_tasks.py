"""Task models with settings a worker must refuse when it starts (the hardening issue)."""

from __future__ import annotations

from typing import Any, ClassVar

from sqlalchemy import Integer
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alchq import BaseQueue


class Base(DeclarativeBase):
    pass


class _Bad(BaseQueue, Base):
    __abstract__ = True
    id: Mapped[int] = mapped_column(Integer, primary_key=True)

    def run(self) -> None:  # pragma: no cover - never runs: refused first
        raise AssertionError("a model with bad settings must not run")


# The table is FaultTask's: a worker refusing the model must leave its rows alone.
class BadNone(_Bad):
    __tablename__ = "fault_task"
    alchq_time_limit: ClassVar[Any] = None


class BadZero(_Bad):
    __tablename__ = "fault_task_zero"
    alchq_time_limit: ClassVar[Any] = 0


class BadText(_Bad):
    __tablename__ = "fault_task_text"
    alchq_time_limit: ClassVar[Any] = "60"


class BadNan(_Bad):
    __tablename__ = "fault_task_nan"
    alchq_time_limit: ClassVar[Any] = float("nan")


class BadErrorLimit(_Bad):
    __tablename__ = "fault_task_error_limit"
    alchq_error_time_limit: ClassVar[Any] = -1
