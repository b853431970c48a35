"""A model whose table lacks one of its columns: an old worker during a deploy.

``MismatchTask`` is FaultTask's table as the *next* version of the code sees
it, with a column ``renamed`` that the table does not have (yet).
"""

from __future__ import annotations

from sqlalchemy import Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alchq import BaseQueue


class Base(DeclarativeBase):
    pass


class MismatchTask(BaseQueue, Base):
    __tablename__ = "fault_task"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    action: Mapped[str | None] = mapped_column(String(30))
    sleep: Mapped[int | None] = mapped_column(Integer)
    errors: Mapped[int | None] = mapped_column(Integer)
    renamed: Mapped[str | None] = mapped_column(String(30))

    def run(self) -> None:  # pragma: no cover - its rows never load
        raise AssertionError("MismatchTask must never run")
