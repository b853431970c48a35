"""The queue's state and the operator's actions, as plain Python (no web framework).

Every function takes a SQLAlchemy :class:`~sqlalchemy.orm.Session` (Flask-SQLAlchemy's
``db.session`` works) and a task model; usable from a script, a view of any
framework or a notebook::

    from alchq import monitoring

    stats = monitoring.queue_stats(session, Report)
    stats.counts["PENDING"], stats.ready, stats.oldest_ready_age, stats.run_time_p95
    monitoring.progress(session, Report, "42")          # Progress(fraction=0.42, ...)
    monitoring.retry(session, Report, "42"); session.commit()
    monitoring.bulk(session, Report, "retry", status="ERROR")   # commits per batch

Reads are a few indexed queries (the same indexes the worker uses), cheap to
call every few seconds on tables of millions of finished tasks. Task keys are
text: ``"42"``, or a JSON list for a composite primary key (:func:`parse_key`).
Actions flush but do not commit, except :func:`bulk`, which commits each batch.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Table,
    and_,
    case,
    func,
    inspect,
    literal,
    or_,
    select,
    tuple_,
    type_coerce,
    update,
)
from sqlalchemy import delete as sql_delete
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Mapper, Session, scoped_session

from alchq._dialects import dialect_for, utc_now
from alchq._dialects.types import UTCDateTime
from alchq._registry import owner_alive
from alchq._util import first_line
from alchq.exceptions import (
    AlchqError,
    CancelError,
    DatabaseError,
    TaskNotFoundError,
    TaskStateError,
)
from alchq.model import (
    FINISHED,
    BaseQueue,
    Status,
    cancelled_values,
    check_task_model,
    key_text,
    key_values,
    progress_table,
    queue_columns,
    rows_of,
    status_is,
    task_table,
    workers_table,
)

__all__ = [
    "MinuteCount",
    "Progress",
    "QueueDepth",
    "QueueStats",
    "RunningTask",
    "TaskDetail",
    "TaskError",
    "TaskPage",
    "TaskSummary",
    "WorkerInfo",
    "bulk",
    "cancel",
    "delete",
    "parse_key",
    "progress",
    "queue_depth",
    "queue_stats",
    "task_models",
    "retry",
    "task",
    "tasks",
    "workers",
]

#: The most recent runs that make the run-time figures (mean, p95).
RUN_TIME_SAMPLE = 1000
#: Errors and running tasks listed by :func:`queue_stats`.
RECENT_ERRORS = 10
RUNNING_SHOWN = 100
#: Minutes of throughput history in :class:`QueueStats`.
HISTORY_MINUTES = 60

Action = Literal["retry", "cancel", "delete"]


class _Data:
    """JSON-ready ``as_dict()`` for the result classes (times as ISO 8601 text)."""

    def as_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]


def _plain(value: Any) -> Any:
    if isinstance(value, _Data):
        return value.as_dict()
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # Decimal, UUID, bytes...: shown, not computed with


@dataclass(frozen=True)
class MinuteCount(_Data):
    """Tasks finished in one minute: PROCESSED, and ERROR (failed for good)."""

    minute: datetime
    processed: int
    failed: int


@dataclass(frozen=True)
class TaskError(_Data):
    key: str
    error_type: str | None
    message: str | None
    finished_at: datetime | None


@dataclass(frozen=True)
class RunningTask(_Data):
    key: str
    worker: str | None
    started_at: datetime | None
    attempt: int
    progress: float | None
    message: str | None


@dataclass(frozen=True)
class QueueStats(_Data):
    """One model's queue at a moment (the database's clock)."""

    model: str
    table: str
    #: every Status value, 0 included
    counts: dict[str, int]
    #: PENDING and due now / due later (delayed, retrying, snoozed)
    ready: int
    scheduled: int
    #: seconds the longest-waiting ready task has been due (None: none ready)
    oldest_ready_age: float | None
    #: the last hour, a minute each, oldest first
    throughput: list[MinuteCount]
    #: seconds per run over the last hour's most recent PROCESSED runs
    run_time_mean: float | None
    run_time_p95: float | None
    recent_errors: list[TaskError]
    running: list[RunningTask]
    now: datetime


@dataclass(frozen=True)
class Progress(_Data):
    """What a running (or finished) task last said of its progress."""

    fraction: float | None
    message: str | None
    updated_at: datetime
    attempt: int
    worker: str | None
    cancel_requested: bool


@dataclass(frozen=True)
class TaskSummary(_Data):
    key: str
    status: str
    priority: int
    run_at: datetime | None
    time_created: datetime | None
    attempts: int
    failures: int
    worker: str | None
    started_at: datetime | None
    finished_at: datetime | None
    error_type: str | None
    progress: float | None
    message: str | None


@dataclass(frozen=True)
class TaskDetail(TaskSummary):
    #: the model's own columns (not alchq's), by attribute name
    columns: dict[str, Any]
    error_message: str | None
    traceback: str | None
    lease_until: datetime | None
    unique_key: str | None
    lost_claims: int
    time_updated: datetime | None


@dataclass(frozen=True)
class TaskPage(_Data):
    items: list[TaskSummary]
    #: how many tasks match the filter, all pages together
    total: int


@dataclass(frozen=True)
class WorkerInfo(_Data):
    id: str
    host: str
    pid: int
    models: list[str]
    version: str
    started_at: datetime
    heartbeat_at: datetime
    #: its heartbeat is fresh; gone workers' rows are deleted after an hour
    alive: bool
    in_hand: int
    supervisor: str | None


# -- reading ---------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueDepth(_Data):
    """How many tasks wait, and how long the oldest has (the cheap part of :class:`QueueStats`)."""

    model: str
    counts: dict[str, int]
    ready: int
    scheduled: int
    oldest_ready_age: float | None
    now: datetime


def queue_depth(session: Session, model: type[BaseQueue]) -> QueueDepth:
    """``model``'s counts by status, ready and scheduled tasks, and the oldest ready one's wait."""
    conn = _connection(session, model)
    c = task_table(model).c
    mine = rows_of(model)
    now = _now(conn)
    # One index each (a count by status of the whole table would scan it).
    counts = {s.value: 0 for s in Status}
    finished = status_is(c.status, *FINISHED)
    for status, n in conn.execute(
        select(c.status, func.count()).where(mine, finished).group_by(c.status)
    ):
        counts[str(Status(status).value)] = int(n)
    counts[Status.PROCESSING.value] = conn.execute(
        select(func.count()).where(mine, status_is(c.status, Status.PROCESSING))
    ).scalar_one()
    due = c.run_at <= now
    pending = conn.execute(
        select(
            func.count(),
            func.coalesce(func.sum(case((due, 1), else_=0)), 0),
            func.min(case((due, c.run_at))),
        ).where(mine, status_is(c.status, Status.PENDING))
    ).one()
    counts[Status.PENDING.value] = int(pending[0])
    oldest = pending[2]
    if isinstance(oldest, str):  # SQLite: min() of text comes back untyped
        oldest = datetime.fromisoformat(oldest)
    return QueueDepth(
        model=model.__name__,
        counts=counts,
        ready=int(pending[1]),
        scheduled=int(pending[0]) - int(pending[1]),
        oldest_ready_age=None
        if oldest is None
        else max(0.0, (now - _aware(oldest)).total_seconds()),
        now=now,
    )


def queue_stats(session: Session, model: type[BaseQueue]) -> QueueStats:
    """``model``'s queue now: counts, readiness, throughput, run times, errors, running tasks."""
    depth = queue_depth(session, model)
    conn = _connection(session, model)
    table = task_table(model)
    c = table.c
    mine = rows_of(model)
    now = depth.now
    return QueueStats(
        model=model.__name__,
        table=table.name,
        counts=depth.counts,
        ready=depth.ready,
        scheduled=depth.scheduled,
        oldest_ready_age=depth.oldest_ready_age,
        throughput=_throughput(conn, model, now),
        **_run_times(conn, model, now),
        recent_errors=[
            TaskError(
                key_text(_pk(table, r)),
                r.alchq_error_type,
                r.alchq_error_message,
                r.alchq_finished_at,
            )
            for r in conn.execute(
                select(
                    *table.primary_key,
                    c.alchq_error_type,
                    c.alchq_error_message,
                    c.alchq_finished_at,
                )
                .where(mine, status_is(c.status, Status.ERROR))
                .order_by(c.alchq_finished_at.desc())
                .limit(RECENT_ERRORS)
            )
        ],
        running=_running(conn, model),
        now=now,
    )


def _throughput(conn: Connection, model: type[BaseQueue], now: datetime) -> list[MinuteCount]:
    table = task_table(model)
    c = table.c
    dialect = dialect_for(conn.engine)
    first = math.floor(now.timestamp() / 60) - HISTORY_MINUTES + 1
    start = datetime.fromtimestamp(first * 60, tz=now.tzinfo)
    minute = dialect.epoch_minute(c.alchq_finished_at).label("minute")
    found: dict[int, list[int]] = {}
    rows = conn.execute(
        select(minute, c.status, func.count())
        # The finished-tasks index: (status, alchq_finished_at).
        .where(
            rows_of(model),
            status_is(c.status, Status.PROCESSED, Status.ERROR),
            c.alchq_finished_at >= type_coerce(start, UTCDateTime()),
        )
        .group_by(minute, c.status)
    )
    for m, status, n in rows:
        slot = found.setdefault(int(m), [0, 0])
        slot[0 if Status(status) is Status.PROCESSED else 1] += int(n)
    return [
        MinuteCount(
            datetime.fromtimestamp((first + i) * 60, tz=now.tzinfo),
            *found.get(first + i, [0, 0]),
        )
        for i in range(HISTORY_MINUTES)
    ]


def _run_times(conn: Connection, model: type[BaseQueue], now: datetime) -> dict[str, Any]:
    c = task_table(model).c
    since = type_coerce(now - timedelta(hours=1), UTCDateTime())
    spans = [
        (end - start).total_seconds()
        for start, end in conn.execute(
            select(c.alchq_started_at, c.alchq_finished_at)
            .where(
                rows_of(model),
                status_is(c.status, Status.PROCESSED),
                c.alchq_finished_at >= since,
            )
            .order_by(c.alchq_finished_at.desc())
            .limit(RUN_TIME_SAMPLE)
        )
        if start is not None and end is not None and end >= start
    ]
    if not spans:
        return {"run_time_mean": None, "run_time_p95": None}
    spans.sort()
    # Nearest-rank percentile: a run time some run really took.
    p95 = spans[min(len(spans) - 1, math.ceil(0.95 * len(spans)) - 1)]
    return {"run_time_mean": sum(spans) / len(spans), "run_time_p95": p95}


def _running(conn: Connection, model: type[BaseQueue]) -> list[RunningTask]:
    table = task_table(model)
    c = table.c
    rows = conn.execute(
        select(*table.primary_key, c.alchq_worker, c.alchq_started_at, c.alchq_attempts)
        .where(rows_of(model), status_is(c.status, Status.PROCESSING))
        .order_by(c.alchq_started_at)
        .limit(RUNNING_SHOWN)
    ).all()
    keys = [(key_text(_pk(table, r)), r) for r in rows]
    notes = _progress_of(conn, table, {k: _claim(r) for k, r in keys})
    return [
        RunningTask(
            key=k,
            worker=r.alchq_worker,
            started_at=r.alchq_started_at,
            attempt=int(r.alchq_attempts),
            progress=notes[k].fraction if k in notes else None,
            message=notes[k].message if k in notes else None,
        )
        for k, r in keys
    ]


def progress(session: Session, model: type[BaseQueue], key: Any) -> Progress | None:
    """What the task last reported with ``alchq_progress()`` in its current (or last)
    attempt; None if it reported nothing (or does not exist).

    A web page polling a task's progress::

        @app.get("/exports/<int:id>/progress")
        def export_progress(id):
            p = monitoring.progress(db.session, Export, id)
            return {"percent": None if p is None or p.fraction is None else round(p.fraction * 100)}
    """
    conn = _connection(session, model)
    table = task_table(model)
    pk = key_values(model, key)
    row = conn.execute(
        select(table.c.alchq_attempts, table.c.alchq_started_at).where(
            *_match(table, pk), rows_of(model)
        )
    ).first()
    if row is None:
        return None
    text = key_text(pk)
    return _progress_of(conn, table, {text: _claim(row)}).get(text)


def _claim(row: Any) -> tuple[int, datetime | None]:
    """A task row's claim, as its progress must match: its attempt, and when it began."""
    return int(row.alchq_attempts), row.alchq_started_at


def _progress_of(
    conn: Connection, table: Table, claims: dict[str, tuple[int, datetime | None]]
) -> dict[str, Progress]:
    """Progress rows of ``table``'s tasks (key text → its claim), of that claim only: not
    an earlier attempt's, nor a deleted task's whose key a new task reuses (its row is
    older than the claim)."""
    attempts = claims
    if not attempts:
        return {}
    notes = progress_table(table.metadata)
    if not _exists(conn, notes):
        return {}  # a database older than progress, no worker of today's has run on it
    n = notes.c
    found: dict[str, Progress] = {}
    keys = list(attempts)
    for i in range(0, len(keys), 500):
        for row in conn.execute(
            select(notes).where(n.task_table == table.fullname, n.task_key.in_(keys[i : i + 500]))
        ):
            attempt, began = attempts[row.task_key]
            if row.attempt == attempt and (began is None or row.updated_at >= began):
                found[row.task_key] = Progress(
                    fraction=row.fraction,
                    message=row.message,
                    updated_at=row.updated_at,
                    attempt=int(row.attempt),
                    worker=row.worker,
                    cancel_requested=row.cancel_requested_at is not None,
                )
    return found


def tasks(
    session: Session,
    model: type[BaseQueue],
    *,
    status: Status | str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> TaskPage:
    """A page of ``model``'s tasks, optionally of one status.

    Ordered as each status is best read (and indexed): PENDING in claim order,
    PROCESSING by start, finished tasks newest first, all statuses by key, newest first.
    """
    conn = _connection(session, model)
    table = task_table(model)
    c = table.c
    where: list[ColumnElement[bool]] = [rows_of(model)]
    pk = list(table.primary_key)
    order: list[Any]
    if status is None:
        order = [col.desc() for col in pk]
    else:
        state = _status(status)
        where.append(status_is(c.status, state))
        if state is Status.PENDING:
            order = [c.priority, c.time_created, *pk]
        elif state is Status.PROCESSING:
            order = [c.alchq_started_at, *pk]
        else:
            order = [c.alchq_finished_at.desc(), *(col.desc() for col in pk)]
    total = conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()
    rows = conn.execute(
        select(table).where(*where).order_by(*order).limit(max(0, limit)).offset(max(0, offset))
    ).all()
    notes = _progress_of(conn, table, {key_text(_pk(table, r)): _claim(r) for r in rows})
    return TaskPage([_summary(table, r, notes) for r in rows], int(total))


def task(session: Session, model: type[BaseQueue], key: Any) -> TaskDetail | None:
    """One task, all its columns and its bookkeeping; None if there is no such task."""
    conn = _connection(session, model)
    table = task_table(model)
    pk = key_values(model, key)
    row = conn.execute(select(table).where(*_match(table, pk), rows_of(model))).first()
    if row is None:
        return None
    notes = _progress_of(conn, table, {key_text(pk): _claim(row)})
    summary = _summary(table, row, notes)
    own = {col.name for col in queue_columns()}
    mapper = inspect(model)
    columns = {
        attr.key: row._mapping[attr.columns[0]]  # noqa: SLF001 - Row's public API
        for attr in mapper.column_attrs
        if attr.key not in own and attr.columns[0].table is table
    }
    return TaskDetail(
        **{f.name: getattr(summary, f.name) for f in fields(TaskSummary)},
        columns=columns,
        error_message=row.alchq_error_message,
        traceback=row.alchq_traceback,
        lease_until=row.alchq_lease_until,
        unique_key=row.unique_key,
        lost_claims=int(row.alchq_lost_claims),
        time_updated=row.time_updated,
    )


def workers(
    session: Session, models: Iterable[type[BaseQueue]], *, include_gone: bool = True
) -> list[WorkerInfo]:
    """The workers registered where ``models`` live, alive first, newest first.

    A worker is alive while its heartbeat renews its row; a worker that stopped
    cleanly has removed its row; a killed one shows as gone until rescuers
    forget it (an hour after its last heartbeat).
    """
    seen: set[tuple[Any, str]] = set()
    found: dict[str, WorkerInfo] = {}
    for model in models:
        conn = _connection(session, model)
        table = workers_table(task_table(model).metadata)
        if (conn.engine, table.fullname) in seen:
            continue
        seen.add((conn.engine, table.fullname))
        w = table.c
        alive = (w.expires_at >= utc_now()).label("alive")
        query = select(table, alive)
        if not include_gone:
            query = query.where(w.expires_at >= utc_now())
        for row in conn.execute(query):
            found.setdefault(
                row.id,
                WorkerInfo(
                    id=row.id,
                    host=row.host,
                    pid=int(row.pid),
                    models=[m.strip() for m in str(row.models).split(",") if m.strip()],
                    version=row.version,
                    started_at=row.started_at,
                    heartbeat_at=row.heartbeat_at,
                    alive=bool(row.alive),
                    in_hand=int(row.in_hand),
                    supervisor=row.supervisor,
                ),
            )
    return sorted(found.values(), key=lambda w: (not w.alive, -w.started_at.timestamp(), w.id))


# -- acting ----------------------------------------------------------------------------


def retry(session: Session, model: type[BaseQueue], key: Any) -> None:
    """Make an ERROR (or CANCELLED) task PENDING again, due now. Not committed.

    Its counters stay (``alchq_attempts`` keeps counting claims, ``alchq_failures``
    failed runs); a retry policy counts on from them.
    """
    with _clear_errors(session, model):
        _retry(session, model, key)


def _retry(session: Session, model: type[BaseQueue], key: Any) -> None:
    _one(session, model, key, _retry_where, "only an ERROR or CANCELLED task can be retried")


def _one(
    session: Session,
    model: type[BaseQueue],
    key: Any,
    act: Callable[[Connection, type[BaseQueue], Sequence[Any]], int],
    refused: str,
) -> None:
    """Apply ``act`` to the task ``key``; its status says why, if it did not apply."""
    conn = _connection(session, model)
    pk = key_values(model, key)
    if act(conn, model, _match(task_table(model), pk)) != 1:
        status = _status_of(conn, model, pk)
        raise TaskStateError(f"{model.__name__} {key_text(pk)} is {status}: {refused}")


def _retry_where(conn: Connection, model: type[BaseQueue], where: Sequence[Any]) -> int:
    table = task_table(model)
    c = table.c
    try:
        with conn.begin_nested():
            return int(
                conn.execute(
                    update(table)
                    .where(
                        *where,
                        rows_of(model),
                        c.status.in_([Status.ERROR, Status.CANCELLED]),
                        _no_error_owed(table),
                    )
                    .values(
                        status=Status.PENDING,
                        run_at=utc_now(),
                        time_updated=utc_now(),
                        alchq_finished_at=None,
                        alchq_lease_until=None,
                    )
                ).rowcount
            )
    except IntegrityError as exc:
        raise TaskStateError(
            f"{model.__name__}: cannot retry: a PENDING or PROCESSING task already has "
            "the same unique_key"
        ) from exc


def cancel(session: Session, model: type[BaseQueue], key: Any) -> Status:
    """Cancel a task: a PENDING one ends CANCELLED at once; a PROCESSING one is asked
    to stop (its worker interrupts run() within about a second, rolls back its
    writes and ends it CANCELLED). Returns the status now (CANCELLED, or PROCESSING
    while the request is on its way). Not committed. A finished task raises
    :class:`alchq.CancelError` (a CANCELLED one is left as it is).
    """
    with _clear_errors(session, model):
        return _cancel(session, model, key)


def _cancel(session: Session, model: type[BaseQueue], key: Any) -> Status:
    conn = _connection(session, model)
    table = task_table(model)
    c = table.c
    pk = key_values(model, key)
    # Read first, then write only a row the read says to: an UPDATE of a row that
    # a running task's transaction holds waits for it on MySQL, even one its WHERE
    # would skip (InnoDB locks a row found by its key before testing the rest).
    lost = and_(c.alchq_lease_until < utc_now(), ~owner_alive(table, workers_table(table.metadata)))
    for _ in range(3):
        row = conn.execute(
            select(c.status, c.alchq_attempts, lost.label("lost")).where(
                *_match(table, pk), rows_of(model)
            )
        ).first()
        if row is None:
            raise TaskNotFoundError(f"{model.__name__} {key_text(pk)} does not exist")
        status = Status(row.status)
        if status is Status.PENDING:
            if _cancel_pending(conn, model, _match(table, pk)) == 1:
                return Status.CANCELLED
            continue  # claimed meanwhile: read it again
        if status is Status.CANCELLED:
            return status
        if status is not Status.PROCESSING:
            raise CancelError(
                f"{model.__name__} {key_text(pk)} is {status}: only a PENDING or PROCESSING "
                "task can be cancelled"
            )
        if row.lost and _cancel_lost(conn, model, _match(table, pk)) == 1:
            return Status.CANCELLED  # its worker is gone: nobody would see a request
        _request_cancel(conn, table, key_text(pk), int(row.alchq_attempts))
        return Status.PROCESSING
    return Status.PROCESSING if status is Status.PROCESSING else status


def _cancel_lost(conn: Connection, model: type[BaseQueue], where: Sequence[Any]) -> int:
    """End CANCELLED the PROCESSING tasks whose claim is lost (lease over, worker gone),
    fenced as a rescue is: a live worker's task, or one rescued meanwhile, is left."""
    table = task_table(model)
    c = table.c
    return int(
        conn.execute(
            update(table)
            .where(
                *where,
                rows_of(model),
                status_is(c.status, Status.PROCESSING),
                c.alchq_lease_until < utc_now(),
                ~owner_alive(table, workers_table(table.metadata)),
            )
            .values(cancelled_values())
        ).rowcount
    )


def _cancel_pending(conn: Connection, model: type[BaseQueue], where: Sequence[Any]) -> int:
    table = task_table(model)
    c = table.c
    return int(
        conn.execute(
            update(table)
            .where(*where, rows_of(model), c.status == Status.PENDING)
            .values(cancelled_values())
        ).rowcount
    )


def _request_cancel(conn: Connection, table: Table, key: str, attempt: int) -> None:
    """Mark the running attempt's progress row: its worker stops run() when it sees it."""
    notes = progress_table(table.metadata)
    n = notes.c
    mine = and_(n.task_table == table.fullname, n.task_key == key)
    changed = conn.execute(
        update(notes)
        .where(mine)
        .values(
            cancel_requested_at=utc_now(),
            # A row left by an earlier attempt now belongs to this one, blank.
            fraction=case((n.attempt == attempt, n.fraction)),
            message=case((n.attempt == attempt, n.message)),
            attempt=attempt,
        )
    ).rowcount
    if changed:
        return
    try:
        with conn.begin_nested():
            conn.execute(
                notes.insert().values(
                    task_table=table.fullname,
                    task_key=key,
                    attempt=attempt,
                    updated_at=utc_now(),
                    cancel_requested_at=utc_now(),
                )
            )
    except IntegrityError:  # its worker wrote its first progress meanwhile
        conn.execute(update(notes).where(mine).values(cancel_requested_at=utc_now()))


def delete(session: Session, model: type[BaseQueue], key: Any) -> None:
    """Delete a task that is not running (cancel a running one first). Not committed."""
    with _clear_errors(session, model):
        _delete(session, model, key)


def _delete(session: Session, model: type[BaseQueue], key: Any) -> None:
    _one(session, model, key, _delete_where, "a running task cannot be deleted (cancel it first)")


def _delete_where(conn: Connection, model: type[BaseQueue], where: Sequence[Any]) -> int:
    table = task_table(model)
    c = table.c
    keys = [
        key_text(_pk(table, r))
        for r in conn.execute(
            select(*table.primary_key).where(
                *where, rows_of(model), c.status != Status.PROCESSING, _no_error_owed(table)
            )
        )
    ]
    if not keys:
        return 0
    done = conn.execute(
        sql_delete(table).where(
            *where, rows_of(model), c.status != Status.PROCESSING, _no_error_owed(table)
        )
    ).rowcount
    notes = progress_table(table.metadata)
    conn.execute(
        sql_delete(notes).where(notes.c.task_table == table.fullname, notes.c.task_key.in_(keys))
    )
    return int(done)


def bulk(
    session: Session,
    model: type[BaseQueue],
    action: Action,
    *,
    status: Status | str | None = None,
    since: datetime | timedelta | None = None,
    batch_size: int = 500,
) -> int:
    """Retry, cancel or delete every task of ``model`` that the filter matches, in batches.

    Each batch is its own transaction (committed here), so a large bulk action
    never holds many locks for long. ``status`` filters by status (default: every
    task the action applies to); ``since``: finished (or, for PENDING tasks,
    created) at or after it, a datetime or a timedelta back from now. Returns how
    many tasks it changed; running tasks asked to stop count as changed.
    """
    if action not in ("retry", "cancel", "delete"):
        raise ValueError(f"unknown action {action!r}: retry, cancel or delete")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number, 1 or more, got {batch_size!r}")
    table = task_table(model)
    c = table.c
    # Only the tasks the action applies to: "every task" must not page through
    # a million finished ones that it would leave as they are.
    applies = {
        "retry": (Status.ERROR, Status.CANCELLED),
        "cancel": (Status.PENDING, Status.PROCESSING),
        "delete": (Status.PENDING, Status.PROCESSED, Status.ERROR, Status.CANCELLED),
    }[action]
    if status is not None and _status(status) not in applies:
        return 0  # e.g. retry of PENDING tasks: nothing to do
    chosen = [_status(status)] if status is not None else list(applies)
    where: list[ColumnElement[bool]] = [rows_of(model), status_is(c.status, *chosen)]
    if since is not None:
        conn = _connection(session, model)
        moment = _now(conn) - since if isinstance(since, timedelta) else since
        at = type_coerce(moment, UTCDateTime())
        where.append(
            or_(
                c.alchq_finished_at >= at, and_(c.alchq_finished_at.is_(None), c.time_created >= at)
            )
        )
    with _clear_errors(session, model):
        return _bulk(session, model, action, where, batch_size)


def _bulk(
    session: Session,
    model: type[BaseQueue],
    action: Action,
    where: list[ColumnElement[bool]],
    batch_size: int,
) -> int:
    table = task_table(model)
    c = table.c
    pk = list(table.primary_key)
    changed = 0
    last: tuple[Any, ...] | None = None
    while True:
        conn = _connection(session, model)
        page = select(*pk).where(*where).order_by(*pk).limit(batch_size)
        if last is not None:
            page = page.where(tuple_(*pk) > tuple_(*(literal(v) for v in last)))
        keys = [tuple(r) for r in conn.execute(page)]
        if not keys:
            break
        last = keys[-1]
        chosen = [tuple_(*pk).in_(keys)] if len(pk) > 1 else [pk[0].in_([k[0] for k in keys])]
        if action == "retry":
            changed += _retry_where(conn, model, chosen)
        elif action == "delete":
            changed += _delete_where(conn, model, chosen)
        else:
            changed += _cancel_pending(conn, model, chosen)
            for row in conn.execute(
                select(*pk, c.alchq_attempts).where(*chosen, c.status == Status.PROCESSING)
            ):
                _request_cancel(conn, table, key_text(tuple(row)[:-1]), int(row.alchq_attempts))
                changed += 1
        session.commit()
    return changed


# -- keys and helpers -------------------------------------------------------------------


def task_models() -> list[type[BaseQueue]]:
    """Every usable task model imported so far (mapped, with run()), one per table, by name.

    A single-table subclass is left out: its rows are in its base's counts (a
    dashboard or a sum of metrics would count them twice); name it to see it apart.
    """
    found: dict[type[BaseQueue], None] = {}
    pending = list(BaseQueue.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        mapper = inspect(cls, raiseerr=False)
        if not isinstance(mapper, Mapper) or mapper.inherits is not None:
            continue  # an abstract mixin of the app's, or a subclass in its base's table
        try:
            check_task_model(cls)
        except AlchqError:
            continue
        found[cls] = None
    return sorted(found, key=lambda m: (m.__name__, m.__module__))


def parse_key(model: type[BaseQueue], text: str) -> tuple[Any, ...]:
    """A task key given as text (``"42"``; ``'[1, "a"]'`` when composite) as column values."""
    return key_values(model, text)


def _no_error_owed(table: Table) -> ColumnElement[bool]:
    """Not an ERROR task whose error() a worker is calling now (its lease still runs)."""
    c = table.c
    return or_(
        c.status != Status.ERROR, c.alchq_lease_until.is_(None), c.alchq_lease_until < utc_now()
    )


def _match(table: Table, pk: Sequence[Any]) -> list[ColumnElement[bool]]:
    return [col == v for col, v in zip(table.primary_key, pk, strict=True)]


def _pk(table: Table, row: Any) -> tuple[Any, ...]:
    return tuple(row._mapping[col] for col in table.primary_key)  # noqa: SLF001 - public API


def _status(value: Status | str) -> Status:
    try:
        return Status(str(value).upper())
    except ValueError:
        raise ValueError(
            f"unknown status {value!r}: one of {', '.join(s.value for s in Status)}"
        ) from None


def _status_of(conn: Connection, model: type[BaseQueue], pk: Sequence[Any]) -> str:
    table = task_table(model)
    status = conn.execute(
        select(table.c.status).where(*_match(table, pk), rows_of(model))
    ).scalar_one_or_none()
    if status is None:
        raise TaskNotFoundError(f"{model.__name__} {key_text(pk)} does not exist")
    return str(Status(status).value)


def _summary(table: Table, row: Any, notes: dict[str, Progress]) -> TaskSummary:
    key = key_text(_pk(table, row))
    note = notes.get(key)
    return TaskSummary(
        key=key,
        status=str(Status(row.status).value),
        priority=int(row.priority),
        run_at=row.run_at,
        time_created=row.time_created,
        attempts=int(row.alchq_attempts),
        failures=int(row.alchq_failures),
        worker=row.alchq_worker,
        started_at=row.alchq_started_at,
        finished_at=row.alchq_finished_at,
        error_type=row.alchq_error_type,
        progress=note.fraction if note else None,
        message=note.message if note else None,
    )


@contextlib.contextmanager
def _clear_errors(session: Session, model: type[BaseQueue]) -> Iterator[None]:
    """A database that is busy or away, said in one line (the app shows it to a person)."""
    try:
        yield
    except DBAPIError as exc:
        with contextlib.suppress(Exception):
            session.rollback()
        bind = session.get_bind(mapper=inspect(model))  # no new connection: it may be down
        dialect = dialect_for(bind if isinstance(bind, Engine) else bind.engine)
        if dialect.is_conflict(exc) or dialect.is_transient(exc):
            raise DatabaseError(
                f"{model.__name__}: the database is busy, try again ({first_line(exc)}); "
                "on SQLite a running task that has written holds the whole file"
            ) from exc
        raise


#: Tables seen to exist, by engine (once seen, not asked again).
_seen: weakref.WeakKeyDictionary[Engine, set[str]] = weakref.WeakKeyDictionary()


def _exists(conn: Connection, table: Table) -> bool:
    seen = _seen.setdefault(conn.engine, set())
    if table.fullname in seen:
        return True
    if not inspect(conn).has_table(table.name, schema=table.schema):
        return False
    seen.add(table.fullname)
    return True


def _connection(session: Session, model: type[BaseQueue]) -> Connection:
    """The session's connection for ``model``. A transaction begun here has the
    isolation of alchq's own (READ COMMITTED on MySQL: its REPEATABLE READ would
    wait on the rows a running task holds, even those the statement skips)."""
    mapper = inspect(model)
    own = session() if isinstance(session, scoped_session) else session  # Flask-SQLAlchemy's
    if not own.in_transaction():
        bind = session.get_bind(mapper=mapper)
        engine = bind if isinstance(bind, Engine) else bind.engine
        level = dialect_for(engine).bookkeeping_isolation
        if level is not None:
            return session.connection(
                bind_arguments={"mapper": mapper}, execution_options={"isolation_level": level}
            )
    return session.connection(bind_arguments={"mapper": mapper})


def _now(conn: Connection) -> datetime:
    now: datetime = conn.execute(select(type_coerce(utc_now(), UTCDateTime()))).scalar_one()
    return now


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)
