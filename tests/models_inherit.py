"""Single-table inheritance: one ``inh_task`` table, a model per kind of task.

As in the app the issue was found with: the base is polymorphic on a ``kind``
column; ``InhExport`` and ``InhOther`` are its subclasses, and
``InhBigExport`` a subclass of ``InhExport``. Each run() writes its class
name into ``note``, so a test sees whose run() ran.
"""

from __future__ import annotations

import os

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from alchq import BaseQueue


class InhBase(DeclarativeBase):
    pass


class InhOwner(InhBase):
    __tablename__ = "inh_owner"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(100))


class InhTask(BaseQueue, InhBase):
    __tablename__ = "inh_task"
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "task"}

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    note: Mapped[str | None] = mapped_column(String(100))
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("inh_owner.id"))
    owner: Mapped[InhOwner | None] = relationship()

    def run(self) -> None:
        self.note = f"{type(self).__name__} {os.getpid()}"


class InhExport(InhTask):
    __mapper_args__ = {"polymorphic_identity": "export"}


class InhBigExport(InhExport):
    __mapper_args__ = {"polymorphic_identity": "big_export"}


class InhOther(InhTask):
    __mapper_args__ = {"polymorphic_identity": "other"}


class InhAbstractBase(BaseQueue, InhBase):
    """A polymorphic base without run(): its subclasses' rows run as theirs."""

    __tablename__ = "inh_abstract"
    __mapper_args__ = {"polymorphic_on": "kind"}

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    note: Mapped[str | None] = mapped_column(String(100))


class InhConcrete(InhAbstractBase):
    __mapper_args__ = {"polymorphic_identity": "concrete"}

    def run(self) -> None:
        self.note = "InhConcrete"


class EnqOwner(InhBase):
    """For enqueue(): a many-to-one relationship (EnqJob.owner) and a collection."""

    __tablename__ = "enq_owner"

    id: Mapped[int] = mapped_column(primary_key=True)
    jobs: Mapped[list[EnqJob]] = relationship(back_populates="owner")


class EnqJob(BaseQueue, InhBase):
    __tablename__ = "enq_job"

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("enq_owner.id"))
    owner: Mapped[EnqOwner | None] = relationship(back_populates="jobs")
    notes: Mapped[list[EnqNote]] = relationship()

    def run(self) -> None:
        pass


class EnqNote(InhBase):
    __tablename__ = "enq_note"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("enq_job.id"))
