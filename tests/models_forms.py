"""Task models of every supported form, for tests/test_model.py.

Defined once, at import, because seed-form models live in the global
``alchq.metadata`` and every class and table name must be unique there. All
names start with ``Mt`` (model test) so that they do not collide with models
of other test modules.

Seed form::      class X(BaseQueue)
Mixin forms::    class X(BaseQueue, Base) with Base one of
                 - a SQLAlchemy 2 ``DeclarativeBase`` subclass,
                 - a legacy ``declarative_base()``,
                 - Flask-SQLAlchemy ``db.Model`` (default model class),
                 - Flask-SQLAlchemy ``SQLAlchemy(model_class=SomeDeclarativeBase)``.
"""

from __future__ import annotations

from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import Column, ForeignKey, Integer, MetaData, String
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    declarative_base,
    mapped_column,
    object_session,
    relationship,
)

from alchq import BaseQueue

# -- seed form ---------------------------------------------------------------------------


class MtSeedFormTask(BaseQueue):
    """The seed's form: plain Columns, no base, no __tablename__."""

    id = Column(Integer, primary_key=True)
    name = Column(String(50))
    result = Column(String(50), nullable=True)

    def run(self) -> None:
        self.result = f"ran {self.name}"  # type: ignore[assignment]


class MtHTTPFetchTask(BaseQueue):
    """An acronym in the class name: table ``mt_http_fetch_task``."""

    id = Column(Integer, primary_key=True)
    url = Column(String(200))

    def run(self) -> None:
        pass


class MtColumnsTask(BaseQueue):
    """For the tests of the columns BaseQueue adds."""

    id = Column(Integer, primary_key=True)
    name = Column(String(50))

    def run(self) -> None:
        pass


class MtNoRunTask(BaseQueue):
    """A model that forgot run()."""

    id = Column(Integer, primary_key=True)


class MtAbstractTask(BaseQueue):
    """Abstract: not mapped, so not a usable task either."""

    __abstract__ = True

    def run(self) -> None:
        pass


# -- mixin form: SQLAlchemy 2 DeclarativeBase ------------------------------------------------


class MtDeclBase(DeclarativeBase):
    pass


class MtDeclOwner(MtDeclBase):
    __tablename__ = "mt_decl_owner"

    id: Mapped[int] = mapped_column(primary_key=True)
    runs: Mapped[int] = mapped_column(default=0)


class MtDeclTask(BaseQueue, MtDeclBase):
    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("mt_decl_owner.id"))
    owner: Mapped[MtDeclOwner] = relationship()

    def run(self) -> None:
        self.owner.runs += 1


# -- mixin form: legacy declarative_base() -----------------------------------------------------

MtLegacyBase = declarative_base(metadata=MetaData())


class MtLegacyOwner(MtLegacyBase):  # type: ignore[misc, valid-type]
    __tablename__ = "mt_legacy_owner"

    id = Column(Integer, primary_key=True)
    runs = Column(Integer, default=0)


class MtLegacyTask(BaseQueue, MtLegacyBase):  # type: ignore[misc, valid-type]
    id = Column(Integer, primary_key=True)
    owner_id = Column(Integer, ForeignKey("mt_legacy_owner.id"), nullable=False)
    owner = relationship(MtLegacyOwner)

    def run(self) -> None:
        self.owner.runs += 1


# -- mixin form: Flask-SQLAlchemy db.Model -------------------------------------------------------

mt_fsa_db = SQLAlchemy()


class MtFsaOwner(mt_fsa_db.Model):  # type: ignore[name-defined, misc]
    id = mt_fsa_db.Column(mt_fsa_db.Integer, primary_key=True)
    runs = mt_fsa_db.Column(mt_fsa_db.Integer, default=0)


class MtFsaTask(BaseQueue, mt_fsa_db.Model):  # type: ignore[name-defined, misc]
    id = mt_fsa_db.Column(mt_fsa_db.Integer, primary_key=True)
    owner_id = mt_fsa_db.Column(mt_fsa_db.ForeignKey("mt_fsa_owner.id"), nullable=False)
    owner: Mapped[MtFsaOwner] = relationship(MtFsaOwner)

    def run(self) -> None:
        # db.session is the task's session under Flask.
        assert object_session(self) is mt_fsa_db.session()
        self.owner.runs += 1


# -- mixin form: Flask-SQLAlchemy with model_class=a DeclarativeBase ------------------------------


class MtFsaDeclBase(DeclarativeBase):
    pass


mt_fsa_decl_db = SQLAlchemy(model_class=MtFsaDeclBase)


class MtFsaDeclOwner(mt_fsa_decl_db.Model):  # type: ignore[name-defined, misc]
    id: Mapped[int] = mapped_column(primary_key=True)
    runs: Mapped[int] = mapped_column(default=0)


class MtFsaDeclTask(BaseQueue, mt_fsa_decl_db.Model):  # type: ignore[name-defined, misc]
    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("mt_fsa_decl_owner.id"))
    owner: Mapped[MtFsaDeclOwner] = relationship()

    def run(self) -> None:
        self.owner.runs += 1
