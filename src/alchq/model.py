"""``BaseQueue``: the mixin that makes a SQLAlchemy model a task queue.

Two forms work::

    class MyTask(BaseQueue):            # alchq maps it, into alchq.metadata
        ...

    class MyTask(BaseQueue, db.Model):  # your base maps it, into your metadata
        ...
"""

from __future__ import annotations

import enum
import json
import math
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, ClassVar, NamedTuple, TypeVar

from sqlalchemy import (
    CheckConstraint,
    Column,
    ColumnElement,
    Enum,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    bindparam,
    event,
    inspect,
    literal_column,
    select,
    true,
    type_coerce,
    update,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    DeclarativeBaseNoMeta,
    DeclarativeMeta,
    Mapped,
    MappedColumn,
    Mapper,
    RelationshipProperty,
    Session,
    declared_attr,
    has_inherited_table,
    mapped_column,
    object_session,
    registry,
)
from sqlalchemy.orm.attributes import set_committed_value

from alchq import _progress
from alchq._dialects import UniqueKey, dialect_for, exact, ready_index_kwargs, utc_now
from alchq._dialects.types import UTCDateTime, key_string, sized_for_mysql
from alchq._notify import note_insert
from alchq.exceptions import CancelError, TaskDefinitionError, TaskNotFoundError
from alchq.scheduling import Periodic, Retry

__all__ = ["BaseQueue", "Enqueued", "Status", "metadata", "task_table"]


class Status(str, enum.Enum):
    """Where a task is in its life. A ``str``, so ``MyTask.status == "PENDING"`` works too.

    ::

        PENDING ──claim──▶ PROCESSING ──run() returns──▶ PROCESSED
       │                         ├──run() raises───▶ ERROR  (then error(exc))
       │                         └──retry / snooze─▶ PENDING (a later run_at)
       └──cancel()──▶ CANCELLED
    """

    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    PROCESSED = "PROCESSED"
    ERROR = "ERROR"
    CANCELLED = "CANCELLED"

    def __str__(self) -> str:
        return self.value


#: Metadata holding the tables of models written in the seed's form
#: (``class MyTask(BaseQueue)``): pass it to ``create_all`` and to Alembic's
#: ``target_metadata``. Models of the mixin form live in their base's metadata.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)
#: The registry that maps seed-form models.
mapper_registry = registry(metadata=metadata)

#: Statuses a task never leaves: prune may delete them.
FINISHED = (Status.PROCESSED, Status.ERROR, Status.CANCELLED)
#: Statuses during which a unique_key is taken.
ACTIVE = (Status.PENDING, Status.PROCESSING)

#: Largest value of the alchq_attempts / alchq_lost_claims / alchq_failures counters.
MAX_COUNTER = 1_000_000

_T = TypeVar("_T", bound="BaseQueue")

_CAMEL = re.compile(r"((?<=[a-z0-9])[A-Z]|(?!^)[A-Z](?=[a-z]))")


def snake_case(name: str) -> str:
    """``MyTask`` → ``my_task``, ``HTTPTask`` → ``http_task`` (as Flask-SQLAlchemy does)."""
    return _CAMEL.sub(r"_\1", name).lower().lstrip("_")


def task_table(model: type[Any]) -> Table:
    """The table a task model's rows live in (its mapper's local table)."""
    table = inspect(model).local_table
    assert isinstance(table, Table), f"{model!r} is not mapped to a table"
    return table


def _insert_values(
    session: Session, mapper: Mapper[Any], task: Any, values: dict[str, Any]
) -> dict[str, Any]:
    """The column values of the INSERT that enqueues ``task`` (built from ``values``).

    A many-to-one relationship keyword (``user=u``) becomes its foreign-key
    columns' values; the subclass's discriminator is set as the ORM would.
    """
    row: dict[str, Any] = {}
    for attr, value in values.items():
        prop = mapper.attrs[attr]
        if isinstance(prop, RelationshipProperty):
            row.update(_foreign_key_values(session, mapper, prop, value))
            continue
        (column,) = prop.columns
        row[column.key] = getattr(task, attr) if attr == "run_at" else value
    row["status"] = Status.PENDING
    for key, value in _discriminator(mapper).items():
        row.setdefault(key, value)
    return row


def _discriminator(mapper: Mapper[Any]) -> dict[str, Any]:
    """The polymorphic discriminator's value for rows inserted without the ORM."""
    on = mapper.polymorphic_on
    if isinstance(on, Column) and mapper.polymorphic_identity is not None:
        return {str(on.key): mapper.polymorphic_identity}
    return {}


def _foreign_key_values(
    session: Session, mapper: Mapper[Any], prop: RelationshipProperty[Any], value: Any
) -> dict[str, Any]:
    name = f"{mapper.class_.__name__}.{prop.key}"
    local = [col for col, _ in prop.local_remote_pairs or ()]
    if (
        prop.uselist
        or prop.secondary is not None
        or not local
        or any(col.table is not mapper.local_table for col in local)
    ):
        raise TypeError(
            f"enqueue() with a unique_key cannot set {name} (only columns and "
            "many-to-one relationships): set it on the task it returns"
        )
    row: dict[str, Any] = {}
    for column, remote in prop.local_remote_pairs or ():
        if value is None:
            row[str(column.key)] = None
            continue
        state = inspect(value)
        if state.transient:
            # As the constructor's cascade would: the new object is saved too.
            session.add(value)
        if value in session and (state.key is None or state.modified):
            session.flush()  # pending or changed: flushed first, so its key is known
        remote_attr = prop.mapper.get_property_by_column(remote).key
        found = getattr(value, remote_attr)
        if found is None:
            raise TypeError(
                f"enqueue() with a unique_key: {name} is a {type(value).__name__} without "
                f"a {remote_attr}; add it to the session first, or pass "
                f"{column.key}= instead"
            )
        row[str(column.key)] = found
    return row


def rows_of(model: type[Any]) -> ColumnElement[bool]:
    """The WHERE clause of ``model``'s own rows in its table.

    Everything, unless ``model`` is a subclass in single-table inheritance:
    then the rows whose discriminator is its identity or a subclass's.
    """
    mapper = inspect(model)
    on = mapper.polymorphic_on
    if mapper.inherits is None or on is None:
        return true()
    identities = sorted(
        {m.polymorphic_identity for m in mapper.self_and_descendants} - {None}, key=repr
    )
    clause: ColumnElement[bool] = on.in_(identities)
    return clause


def joined_inheritance(mapper: Mapper[Any]) -> Mapper[Any] | None:
    """The ancestor mapper whose table ``mapper`` joins, if it has a table of its own."""
    parent = mapper.inherits
    if parent is not None and mapper.local_table is not parent.local_table:
        return parent
    return None


class Enqueued(NamedTuple):
    """What :meth:`BaseQueue.enqueue` did: the task, and whether it is a new row."""

    task: Any
    created: bool


def _mapped_by_its_base(cls: type) -> bool:
    """True when a declarative base in ``cls``'s MRO maps it (the mixin form)."""
    return isinstance(cls, DeclarativeMeta) or issubclass(
        cls, (DeclarativeBase, DeclarativeBaseNoMeta)
    )


class BaseQueue:
    """Mixin for a task model: a row is a task, its columns are the task's data.

    Subclasses define their own columns (including a primary key) and a
    ``run()`` method; ``error(exc)`` is optional. BaseQueue adds:

    ``status``
        a :class:`Status`, PENDING for a new row.
    ``time_created``, ``time_updated``
        timezone-aware UTC times from the database's clock.
    ``run_at``
        not claimed before this time (database clock); default: when created.
        Pass a ``timedelta`` to mean "this long from now" on the database's clock.
    ``priority``
        smaller runs first (default 0; -10 is more urgent than 0, 10 less).
    ``unique_key``
        optional; at most one PENDING or PROCESSING task of the model has a
        given key (see :meth:`enqueue`).
    ``alchq_attempts``
        how many times the task has been claimed (runs, including snoozed ones;
        a claim handed back unrun at shutdown is not counted).
    ``alchq_failures``
        how many runs failed (raised); with a retry policy, compared to its attempts.
    ``alchq_worker``
        the worker that holds (or last held) the claim.
    ``alchq_started_at``, ``alchq_finished_at``
        when the last run started and ended.
    ``alchq_lease_until``
        while PROCESSING: when the claim expires unless the worker's heartbeat
        renews it.
    ``alchq_lost_claims``
        how many claims of this task were lost with their worker.
    ``alchq_error_type``, ``alchq_error_message``, ``alchq_traceback``
        the exception of a failed run.

    Example::

        class MyTask(BaseQueue):
            id = Column(Integer, primary_key=True)
            operation = Column(String)

            def run(self):
                print(self.operation)
    """

    __alchq_base__: ClassVar[bool] = True

    #: Seconds a run may take before it is interrupted and ends in ERROR
    #: with :class:`alchq.TaskTimeoutError`. Override per model.
    alchq_time_limit: ClassVar[float] = 3600.0

    #: Seconds ``error()`` may take before it is interrupted (it has its own
    #: time, apart from run()'s). Override per model.
    alchq_error_time_limit: ClassVar[float] = 60.0

    #: Most tasks of this model a worker claims at once and commits together
    #: when the queue is busy and its tasks are short (each task still commits
    #: or rolls back on its own; see the README's "Batches"). 1: never batched.
    alchq_batch: ClassVar[int] = 50

    #: Built-in retries: an :class:`alchq.Retry`, or None (the seed's behaviour:
    #: ERROR at the first failure).
    alchq_retry: ClassVar[Retry | None] = None

    #: Periodic tasks this model creates: :class:`alchq.Periodic` schedules.
    alchq_periodic: ClassVar[Sequence[Periodic]] = ()

    @declared_attr.directive
    def __tablename__(cls) -> str | None:  # noqa: N805 - declared_attr is a class method
        if has_inherited_table(cls):  # type: ignore[arg-type]
            # A subclass of a mapped task model: single-table inheritance.
            return None
        return snake_case(cls.__name__)  # type: ignore[attr-defined]

    status: Mapped[Status] = mapped_column(
        # A plain string column; its CHECK constraint is added per table
        # (see _add_queue_schema) so that its name is unique per table.
        Enum(Status, native_enum=False, create_constraint=False, length=16, validate_strings=True),
        default=Status.PENDING,
        server_default=Status.PENDING.value,
        nullable=False,
    )
    time_created: Mapped[datetime] = mapped_column(
        UTCDateTime(), server_default=utc_now(), nullable=False
    )
    time_updated: Mapped[datetime] = mapped_column(
        UTCDateTime(), server_default=utc_now(), onupdate=utc_now(), nullable=False
    )
    run_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), server_default=utc_now(), nullable=False
    )
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0", nullable=False)
    unique_key: Mapped[str | None] = mapped_column(key_string(255), nullable=True)
    alchq_attempts: Mapped[int] = mapped_column(
        Integer, default=0, server_default="0", nullable=False
    )
    alchq_failures: Mapped[int] = mapped_column(
        Integer, default=0, server_default="0", nullable=False
    )
    alchq_worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    alchq_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    alchq_finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    alchq_lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    alchq_lost_claims: Mapped[int] = mapped_column(
        Integer, default=0, server_default="0", nullable=False
    )
    alchq_error_type: Mapped[str | None] = mapped_column(String(255), nullable=True)
    alchq_error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    alchq_traceback: Mapped[str | None] = mapped_column(Text, nullable=True)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("__abstract__", False) or _mapped_by_its_base(cls):
            return
        if "__mapper__" in cls.__dict__:
            return
        # The seed's form: no declarative base of the app's, so alchq maps it.
        mapper_registry.map_declaratively(cls)

    def __init__(self, **kwargs: Any) -> None:
        cls = type(self)
        for key, value in kwargs.items():
            if not hasattr(cls, key):
                raise TypeError(f"{key!r} is an invalid keyword argument for {cls.__name__}")
            if key == "run_at" and isinstance(value, timedelta):
                # Relative to the database's clock, evaluated by the INSERT.
                value = utc_now(value.total_seconds())
            setattr(self, key, value)
        if "status" not in kwargs:
            self.status = Status.PENDING

    @classmethod
    def enqueue(cls: type[_T], session: Session, **values: Any) -> Enqueued:
        """Add a task to ``session`` (flushed, not committed); return ``(task, created)``.

        With a ``unique_key`` that a PENDING or PROCESSING task of this model
        already has, no row is added: ``created`` is False and ``task`` is that
        existing task. The database's unique index decides, so two racing
        callers create one task between them. Without a unique_key this is
        ``session.add(cls(**values))`` plus a flush, and ``created`` is True.

        Example::

            task, created = Report.enqueue(session, unique_key="daily-2026-11-29", day=...)
            session.commit()
        """
        key = values.get("unique_key")
        if key is None:
            task = cls(**values)
            session.add(task)
            session.flush()
            return Enqueued(task, True)
        mapper = inspect(cls)
        # Checks the keywords and converts run_at; built without relationships,
        # which would link this throwaway object to the related ones.
        task = cls(**{k: v for k, v in values.items() if k not in mapper.relationships})
        table = task_table(cls)
        c = table.c
        active = c.status.in_([s.value for s in ACTIVE])
        row = _insert_values(session, mapper, task, values)
        conn = session.connection(bind_arguments={"mapper": mapper})
        engine = conn.engine
        unique = unique_index(table)
        dialect = dialect_for(engine)
        for _ in range(5):
            inserted = dialect.insert_one_unless_conflict(conn, table, row, unique)
            if inserted is not None:
                note_insert(session, table, engine)  # a Core insert: no flush sees it
                ident = inserted if len(inserted) > 1 else inserted[0]
                new = session.get(cls, ident)
                assert new is not None
                return Enqueued(new, True)
            # The key is unique per table: under single-table inheritance the
            # holder may be another subclass's task (it is returned as such).
            holder = select(mapper.base_mapper).where(c.unique_key == key, active).limit(1)
            existing = session.scalars(dialect.read_latest(holder)).first()
            if existing is not None:
                return Enqueued(existing, False)
            # The holder of the key finished in between: try again.
        raise RuntimeError(f"{cls.__name__}: could not enqueue unique_key {key!r}")

    @classmethod
    def enqueue_many(cls, session: Session, rows: Iterable[Mapping[str, Any]]) -> int:
        """Add many tasks in a few round trips, in ``session``'s transaction; return how many.

        Each row is a mapping of column attributes, as the constructor takes
        (no relationships: pass foreign keys). Rows are inserted with
        multi-row INSERTs, without building ORM objects. Unique keys are
        honoured as by :meth:`enqueue`: a row whose ``unique_key`` a PENDING or
        PROCESSING task (or an earlier row of the same call) already holds is
        skipped, and not counted. A ``run_at`` may be a ``timedelta`` from the
        database's clock. Nothing is committed; tasks already in the session
        are flushed first. Example::

            Report.enqueue_many(db.session, [{"day": d} for d in days])
            db.session.commit()
        """
        mapper = inspect(cls)
        table = task_table(cls)
        session.flush()
        conn = session.connection(bind_arguments={"mapper": mapper})
        columns = {
            key: prop.columns[0].key
            for key, prop in mapper.column_attrs.items()
            if len(prop.columns) == 1 and prop.columns[0].table is table
        }
        fixed: dict[str, Any] = {"status": Status.PENDING, **_discriminator(mapper)}
        now: datetime | None = None
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for row in rows:
            values = dict(fixed)
            for key, value in row.items():
                if key not in columns:
                    raise TypeError(
                        f"enqueue_many(): {key!r} is not a column of {cls.__name__}"
                        + (" (pass its foreign key instead)" if key in mapper.relationships else "")
                    )
                if key == "run_at" and isinstance(value, timedelta):
                    if now is None:  # the database's clock, read once
                        now = conn.execute(
                            select(type_coerce(utc_now(), UTCDateTime()))
                        ).scalar_one()
                    value = now + value
                values[columns[key]] = value
            groups.setdefault(tuple(sorted(values)), []).append(values)
        if not groups:
            return 0
        created = 0
        dialect = dialect_for(conn.engine)
        unique = unique_index(table)
        for same_keys in groups.values():
            created += dialect.insert_unless_conflict(conn, table, same_keys, unique)
        if created:
            note_insert(session, table, conn.engine)
        return created

    def cancel(self, session: Session | None = None) -> None:
        """Cancel this task if it is PENDING: it ends CANCELLED and never runs.

        Runs in ``session`` (default: the task's own); commit it to make it
        stick. Cancelling a CANCELLED task does nothing. A PROCESSING,
        PROCESSED or ERROR task raises :class:`alchq.CancelError`.
        """
        session = session if session is not None else object_session(self)
        if session is None:
            raise CancelError(f"{self!r} is not in a session: pass the session to cancel()")
        state = inspect(self)
        if state.key is None:
            session.flush()
        mapper = state.mapper
        table = task_table(mapper.class_)
        c = table.c
        ident = inspect(self).identity
        if ident is None:  # transient, and not added to ``session``
            raise CancelError(f"{self!r} was never saved: add it to the session first")
        match = [col == v for col, v in zip(mapper.primary_key, ident, strict=True)]
        conn = session.connection(bind_arguments={"mapper": mapper})
        done = conn.execute(
            update(table).where(*match, c.status == Status.PENDING).values(cancelled_values())
        ).rowcount
        if done != 1:
            status = conn.execute(select(c.status).where(*match)).scalar_one_or_none()
            if status != Status.CANCELLED:
                what = "deleted" if status is None else str(status)
                raise CancelError(
                    f"{type(self).__name__} {ident[0] if len(ident) == 1 else ident} is "
                    f"{what}: only a PENDING task can be cancelled"
                )
        set_committed_value(self, "status", Status.CANCELLED)
        if self in session:  # a task of another session (or detached) cannot be expired here
            session.expire(self, ["alchq_finished_at", "time_updated", "alchq_lease_until"])

    def alchq_progress(self, fraction: float | None = None, message: str | None = None) -> None:
        """Say how far ``run()`` is, while it runs: visible to the app before run() ends.

        ``fraction`` is from 0 to 1 (0.42 is 42%; None: not known), ``message``
        a short text (cut at 255 characters). Example::

            def run(self):
                for i, page in enumerate(pages):
                    export(page)
                    self.alchq_progress((i + 1) / len(pages), f"page {i + 1} of {len(pages)}")

        Cheap to call in a tight loop: it only notes the value; the worker
        writes the latest one on a connection of its own about once a second
        (and once more when run() ends), so it never waits on run()'s own
        transaction. Read it with :func:`alchq.monitoring.progress`. Outside a
        worker (run() called by hand) it does nothing.
        """
        fraction, message = _progress.checked(fraction, message)
        _progress.report(self, fraction, message)

    def run(self) -> None:
        """Do the task. Override this; the worker calls it once per claim."""
        raise NotImplementedError(f"{type(self).__name__} must define run()")

    def error(self, exc: BaseException) -> None:
        """Called after ``run()`` raised ``exc`` and the task was saved as ERROR.

        The default does nothing (the worker has already logged the failure).
        """

    def __repr__(self) -> str:
        state = inspect(self)
        key = state.identity if state.identity is not None else "transient"
        status = self.__dict__.get("status")
        return f"<{type(self).__name__} {key} {status}>"


def cancelled_values() -> dict[str, Any]:
    """The columns of a task ending CANCELLED (by cancel(), or cancelled while it ran)."""
    return {
        "status": Status.CANCELLED,
        "alchq_finished_at": utc_now(),
        "alchq_lease_until": None,
        "time_updated": utc_now(),
    }


def queue_columns() -> list[Column[Any]]:
    """Fresh copies of the columns BaseQueue adds to every task table, in order."""
    columns = []
    for name, attr in vars(BaseQueue).items():
        if isinstance(attr, MappedColumn):
            column = attr.column._copy()  # noqa: SLF001 - Column.copy() is deprecated
            column.name = column.key = name
            columns.append(column)
    return columns


def _add_queue_schema(mapper: Mapper[Any], cls: type) -> None:
    """Indexes and constraints of each task table (added once, to the mapped table)."""
    parent = joined_inheritance(mapper)
    if parent is not None:
        raise TaskDefinitionError(_joined_message(cls.__name__, parent.class_.__name__))
    table = mapper.local_table
    if not isinstance(table, Table) or mapper.inherits is not None:
        return
    for column in table.columns:
        column.type = sized_for_mysql(column.type)
    if getattr(cls, "alchq_periodic", None):
        ticks_table(table.metadata)
    workers_table(table.metadata)
    progress_table(table.metadata)
    add_queue_schema(table)


def _joined_message(name: str, parent: str) -> str:
    return (
        f"{name} has a table of its own, joined to {parent}'s (joined-table "
        "inheritance): alchq does not support it, because claiming a task is one "
        "UPDATE of one table and a task's data would be split across two. Use "
        f"single-table inheritance (no __tablename__ on {name}, a discriminator "
        f"column on {parent}), or a separate task model"
    )


def add_queue_schema(table: Table) -> None:
    """Add alchq's indexes and CHECK constraints to ``table`` (once).

    ``table`` has BaseQueue's columns and its primary key: a mapped task
    table, or one built by a migration that adopts an existing table.
    """
    ready = f"ix_{table.name}_alchq_ready"
    if any(ix.name == ready for ix in table.indexes):
        return
    cols = table.c
    pk = list(table.primary_key)
    # The claim's query, in its order. Leading with status makes the index
    # useful on MySQL too, which has no partial indexes; elsewhere only
    # PENDING rows are in it at all.
    Index(
        ready,
        cols.status,
        cols.priority,
        cols.time_created,
        *pk,
        **ready_index_kwargs(cols.status == Status.PENDING.value),
    )
    table.append_constraint(
        CheckConstraint(
            exact(cols.status).in_([s.value for s in Status]),
            name=_check_name(table, "alchq_status"),
        )
    )
    # One PENDING or PROCESSING task per unique_key. (MySQL/MariaDB have no
    # partial indexes: the index is not unique there; see the dialect seam.)
    Index(
        unique_index_name(table),
        cols.unique_key,
        unique=True,
        **ready_index_kwargs(
            cols.unique_key.is_not(None) & cols.status.in_([s.value for s in ACTIVE])
        ),
    )
    # Pruning's query: finished tasks by age, in batches.
    Index(
        f"ix_{table.name}_alchq_finished",
        cols.status,
        cols.alchq_finished_at,
        **ready_index_kwargs(cols.status.in_([s.value for s in FINISHED])),
    )
    # The rescue's query: expired leases among the (few) PROCESSING rows.
    Index(
        f"ix_{table.name}_alchq_leases",
        cols.status,
        cols.alchq_lease_until,
        **ready_index_kwargs(cols.status == Status.PROCESSING.value),
    )
    # ERROR rows whose error() is not done yet (its lease still set): the
    # rescue's query for those whose worker was lost. Empty almost always.
    Index(
        f"ix_{table.name}_alchq_error_owed",
        cols.status,
        cols.alchq_lease_until,
        **ready_index_kwargs(
            (cols.status == Status.ERROR.value) & cols.alchq_lease_until.is_not(None)
        ),
    )
    # Counters a hand-written row could get wrong; the bound keeps "+ 1" in the
    # claim and the rescue from ever overflowing the column.
    table.append_constraint(
        CheckConstraint(
            cols.alchq_attempts.between(0, MAX_COUNTER)
            & cols.alchq_lost_claims.between(0, MAX_COUNTER)
            & cols.alchq_failures.between(0, MAX_COUNTER),
            name=_check_name(table, "alchq_counters"),
        )
    )


def unique_index_name(table: Table) -> str:
    """The name of ``table``'s unique index on the active tasks' ``unique_key``."""
    return f"ix_{table.name}_alchq_unique"


def unique_index(table: Table) -> UniqueKey:
    """``table``'s unique index of active ``unique_key`` values, for an insert that
    skips a taken key."""
    c = table.c
    # Literal values: the index's predicate, and no expanding IN in an executemany.
    states: list[Any] = [literal_column(f"'{s.value}'") for s in ACTIVE]
    return UniqueKey(
        unique_index_name(table), (c.unique_key,), c.unique_key.is_not(None) & c.status.in_(states)
    )


def status_is(status: ColumnElement[Any], *statuses: Status) -> ColumnElement[bool]:
    """SQL: ``status`` is one of ``statuses``, written so that SQLite uses the partial indexes.

    SQLite uses a partial index only for a query that repeats its WHERE term
    with the same literals (parameters are not compared by value); PostgreSQL
    infers it either way. The values are alchq's own status names, never input.
    """
    values = [s.value for s in statuses]
    clause: ColumnElement[bool]
    if len(values) == 1:  # "IN (one)" is not "=" to SQLite's planner
        clause = status == bindparam("alchq_status", values[0], literal_execute=True)
    else:
        clause = status.in_(
            bindparam("alchq_statuses", values, expanding=True, literal_execute=True)
        )
    if all(s in FINISHED for s in statuses):
        finished = [s.value for s in FINISHED]
        clause = clause & status.in_(
            bindparam("alchq_finished", finished, expanding=True, literal_execute=True)
        )
    return clause


def ticks_table(metadata: MetaData) -> Table:
    """The table recording each periodic tick that created a task (one per metadata).

    Its primary key (schedule, tick) is what makes a tick create exactly one
    task, however many schedulers run.
    """
    key = f"{metadata.schema}.alchq_ticks" if metadata.schema else "alchq_ticks"
    existing = metadata.tables.get(key)
    if existing is not None:
        return existing
    return Table(
        "alchq_ticks",
        metadata,
        Column("schedule", String(255), nullable=False),
        Column("tick", UTCDateTime(), nullable=False),
        Column("time_created", UTCDateTime(), server_default=utc_now(), nullable=False),
        PrimaryKeyConstraint("schedule", "tick", name="pk_alchq_ticks"),
    )


def workers_table(metadata: MetaData) -> Table:
    """The worker registry (one per metadata): a row per live worker, renewed by its heartbeat.

    A claim stays alive while its worker's row here is fresh. The heartbeat
    writes this row, never the task's, which run()'s own transaction may hold
    (or, under REPEATABLE READ and SERIALIZABLE, must not see change).
    """
    key = f"{metadata.schema}.alchq_workers" if metadata.schema else "alchq_workers"
    existing = metadata.tables.get(key)
    if existing is not None:
        return existing
    return Table(
        "alchq_workers",
        metadata,
        Column("id", String(255), nullable=False),
        Column("host", String(255), nullable=False),
        Column("pid", Integer, nullable=False),
        # Where the process runs (boot id and pid namespace) and when it started:
        # a rescuer on the same machine can ask the operating system if it lives.
        Column("node", String(255), nullable=True),
        Column("process_start", String(64), nullable=True),
        Column("supervisor", String(255), nullable=True),
        Column("models", Text, nullable=False),
        Column("version", String(32), nullable=False),
        Column("started_at", UTCDateTime(), server_default=utc_now(), nullable=False),
        Column("heartbeat_at", UTCDateTime(), server_default=utc_now(), nullable=False),
        Column("expires_at", UTCDateTime(), nullable=False),
        Column("in_hand", Integer, server_default="0", nullable=False),
        PrimaryKeyConstraint("id", name="pk_alchq_workers"),
    )


def progress_table(metadata: MetaData) -> Table:
    """Progress reported by running tasks, and cancel requests for them (one per metadata).

    A row per task that reported progress (or was asked to stop), keyed by its
    table's full name (``schema.table`` in a schema) and its key as text. Kept
    apart from the task's row: run()'s own transaction may hold that row's lock,
    and a progress write must never wait for it. ``attempt`` is the claim it
    belongs to (the task's ``alchq_attempts``): a later attempt's readers ignore
    an earlier attempt's progress.
    """
    key = f"{metadata.schema}.alchq_progress" if metadata.schema else "alchq_progress"
    existing = metadata.tables.get(key)
    if existing is not None:
        return existing
    return Table(
        "alchq_progress",
        metadata,
        Column("task_table", String(255), nullable=False),
        Column("task_key", String(255), nullable=False),
        Column("attempt", Integer, nullable=False),
        Column("worker", String(255), nullable=True),
        Column("fraction", Float, nullable=True),
        Column("message", String(_progress.MESSAGE_LENGTH), nullable=True),
        Column("updated_at", UTCDateTime(), server_default=utc_now(), nullable=False),
        Column("cancel_requested_at", UTCDateTime(), nullable=True),
        PrimaryKeyConstraint("task_table", "task_key", name="pk_alchq_progress"),
    )


def key_text(pk: Sequence[Any]) -> str:
    """A task's primary key as text: ``42``, or a JSON list for a composite key."""
    if len(pk) == 1:
        return str(pk[0])
    return json.dumps([v if isinstance(v, (int, str)) else str(v) for v in pk])


def key_values(model: type[BaseQueue], key: Any) -> tuple[Any, ...]:
    """A task's primary key values from a key as given: a task, a tuple, a value, or
    its text (:func:`key_text`); :class:`alchq.TaskNotFoundError` if it cannot be one."""
    columns = list(task_table(model).primary_key)
    if isinstance(key, BaseQueue):
        ident = inspect(key).identity
        if ident is None:
            raise TaskNotFoundError(f"{key!r} was never saved")
        return tuple(ident)
    if isinstance(key, tuple):
        values = list(key)
    elif len(columns) == 1:
        values = [key]
    else:
        try:
            values = json.loads(key) if isinstance(key, str) else list(key)
        except (ValueError, TypeError):
            values = []
        if not isinstance(values, list):
            values = []
    if len(values) != len(columns):
        raise TaskNotFoundError(
            f"{model.__name__}: {key!r} is not a key of this model "
            f"({len(columns)} column{'s' if len(columns) > 1 else ''}: "
            f"{', '.join(c.name for c in columns)})"
        )
    return tuple(_typed_key(model, col, v) for col, v in zip(columns, values, strict=True))


def _typed_key(model: type[BaseQueue], column: Any, value: Any) -> Any:
    try:
        kind = column.type.python_type
    except NotImplementedError:
        return value
    if isinstance(value, kind):
        return value
    try:
        if kind is int and not isinstance(value, bool):
            return int(str(value).strip())
        if kind is uuid.UUID:
            return uuid.UUID(str(value))
        if kind is str:
            return str(value)
    except ValueError:
        raise TaskNotFoundError(
            f"{model.__name__}: {value!r} is not a valid {column.name} ({kind.__name__})"
        ) from None
    return value


def _check_name(table: Table, name: str) -> str:
    """A CHECK constraint name unique per database (MySQL requires it) with or without
    a naming convention in the table's metadata."""
    if "ck" in table.metadata.naming_convention:
        return name  # the convention adds the table name
    return f"ck_{table.name}_{name}"


event.listen(BaseQueue, "after_mapper_constructed", _add_queue_schema, propagate=True)


def schedules_of(model: type[BaseQueue]) -> list[Periodic]:
    """The model's periodic schedules (``alchq_periodic`` may also be one schedule)."""
    declared = model.alchq_periodic
    return [declared] if isinstance(declared, Periodic) else list(declared)


def _subclass_runs(model: type[BaseQueue]) -> bool:
    """A polymorphic base without run() whose subclasses have it: rows run as theirs."""
    try:
        mapper = inspect(model)
    except Exception:
        return False
    return any(m.class_.run is not BaseQueue.run for m in mapper.self_and_descendants)


def check_task_model(model: object) -> type[BaseQueue]:
    """Return ``model`` if it is a mapped BaseQueue subclass with ``run()``, else raise."""
    if not isinstance(model, type) or not issubclass(model, BaseQueue):
        raise TaskDefinitionError(f"{model!r} is not a BaseQueue model")
    if model.run is BaseQueue.run and not _subclass_runs(model):
        raise TaskDefinitionError(
            f"{model.__name__} has no run() method: define run(self) on the model"
        )
    try:
        mapper = inspect(model)
    except Exception:
        mapper = None
    if mapper is None or not isinstance(mapper, Mapper):
        raise TaskDefinitionError(f"{model.__name__} is not a mapped model (is it abstract?)")
    if len(mapper.primary_key) == 0:
        raise TaskDefinitionError(f"{model.__name__} has no primary key")
    parent = joined_inheritance(mapper)
    if parent is not None:
        raise TaskDefinitionError(_joined_message(model.__name__, parent.class_.__name__))
    for attr in ("alchq_time_limit", "alchq_error_time_limit"):
        seconds = getattr(model, attr)
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not math.isfinite(seconds)
            or seconds <= 0
        ):
            raise TaskDefinitionError(
                f"{model.__name__}.{attr} must be a number of seconds more than 0, got {seconds!r}"
            )
    batch = model.alchq_batch
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise TaskDefinitionError(
            f"{model.__name__}.alchq_batch must be a whole number of tasks, 1 or more, "
            f"got {batch!r}"
        )
    if model.alchq_retry is not None and not isinstance(model.alchq_retry, Retry):
        raise TaskDefinitionError(
            f"{model.__name__}.alchq_retry must be an alchq.Retry or None, "
            f"got {model.alchq_retry!r}"
        )
    declared = model.alchq_periodic
    for periodic in [declared] if isinstance(declared, Periodic) else list(declared):
        if not isinstance(periodic, Periodic):
            raise TaskDefinitionError(
                f"{model.__name__}.alchq_periodic must hold alchq.Periodic schedules, "
                f"got {periodic!r}"
            )
        unknown = [k for k in periodic.values if k not in mapper.column_attrs]
        if unknown:
            raise TaskDefinitionError(
                f"{model.__name__}: periodic task {periodic.spec!r} sets unknown "
                f"column(s) {', '.join(map(repr, unknown))}"
            )
    return model
