"""Periodic tasks (``alchq_periodic = [Periodic(...)]``), on SQLite and PostgreSQL.

The headline: 5 ``alchq run`` processes on a SQLite file and 5 on PostgreSQL,
all at the same time, each running the scheduler of a per-second schedule for
3 minutes of ticks, create exactly one task per tick: as many tasks as there
are seconds between the first tick and the last, none twice, and every one of
them processed exactly once.

Which tick created a task is written on the task itself (``tick``, see
tests/models_periodic.py), so the checks count ticks in the database, not in
log lines or by timing.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, delete, func, insert, inspect, select

from alchq import ConfigurationError, Periodic, Status, TaskDefinitionError, worker
from alchq._binds import Binds
from alchq._dialects import utc_now
from alchq._scheduler import Scheduler
from alchq._sessions import resolve
from alchq.config import Settings
from alchq.model import ticks_table
from alchq.worker import Worker
from tests.conftest import (
    ROOT,
    _fresh_pg_database,
    alchq_command,
    fresh_mariadb_database,
    run_alchq,
    worker_env,
)
from tests.models_periodic import (
    PqCatchUp,
    PqHeadline,
    PqLaggard,
    PqNamed,
    PqNoCatchUp,
    PqNotAPeriodic,
    PqNotNull,
    PqSingle,
    PqSteady,
    PqTwo,
    PqYearly,
    metadata,
    run_log,
)
from tests.support import wait_until

UTC = timezone.utc
SECOND = timedelta(seconds=1)
ticks: Any = ticks_table(metadata)

#: The headline test: seconds of ticks, and worker processes per database.
HEADLINE_SPAN = 180
WORKERS_PER_DB = 5

#: "<Model> <id> created by schedule '<spec>' for <tick>", as alchq.scheduler logs it.
CREATED = re.compile(r"alchq\.scheduler: (\w+) (\S+) created by schedule '(.*)' for (\S+)$")


# -- helpers -------------------------------------------------------------------


def env() -> dict[str, str]:
    """worker_env() without settings of ours that would change what is tested."""
    return {k: v for k, v in worker_env().items() if not k.startswith("ALCHQ_")}


def table(model: type) -> Any:
    return model.__table__  # type: ignore[attr-defined]


def as_utc(value: Any) -> datetime:
    """A database time (SQLite may give text or a naive datetime) as aware UTC."""
    when = datetime.fromisoformat(value) if isinstance(value, str) else value
    assert isinstance(when, datetime)
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def db_now(engine: Engine) -> datetime:
    with engine.connect() as conn:
        return as_utc(conn.execute(select(utc_now())).scalar_one())


def rows(engine: Engine, model: type) -> list[Any]:
    t = table(model)
    with engine.connect() as conn:
        return list(conn.execute(select(t).order_by(t.c.id)).all())


def task_ticks(engine: Engine, model: type, **where: Any) -> list[datetime]:
    t = table(model)
    query = select(t.c.tick).where(*(t.c[k] == v for k, v in where.items())).order_by(t.c.id)
    with engine.connect() as conn:
        return [as_utc(v) for v in conn.scalars(query)]


def runs(engine: Engine, model: type) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(run_log.c.task_id, run_log.c.pid).where(run_log.c.model == model.__name__)
            ).all()
        )


def laggard_scheduler(engine: Engine, clock: Callable[[Any], datetime]) -> Scheduler:
    """A scheduler of PqLaggard whose reading of the database clock is ``clock``."""
    return Scheduler([PqLaggard], Binds(resolve(engine=engine)), Settings(), clock=clock)


def start_worker(url: str, *models: str, log: Path, poll: str = "0.2") -> subprocess.Popen[bytes]:
    command = alchq_command("run", *models, "--database-url", url, "--poll-interval", poll)
    # Output goes to a file: a full pipe must not block a worker.
    with log.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env())


def stop_workers(procs: list[subprocess.Popen[bytes]], timeout: float = 60) -> list[int | None]:
    """SIGTERM every worker at once; wait for them (killing any that hangs)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    codes: list[int | None] = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            codes.append(None)  # hung: reported as such
    return codes


@pytest.fixture
def tables(engine: Engine) -> Iterator[Engine]:
    metadata.create_all(engine)
    yield engine


@pytest.fixture
def scheduler_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="alchq.scheduler")
    return caplog


# -- 1. the headline: 5 + 5 workers, 3 minutes of per-second ticks ------------------------


@pytest.mark.periodic3m
@pytest.mark.timeout(HEADLINE_SPAN + 300)
def test_five_workers_on_each_database_create_exactly_one_task_per_tick(
    pg_base_url: str | None, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The databases share the same 3 minutes: 5 worker processes each run at once."""
    if pg_base_url is None:
        pytest.skip("PostgreSQL is not available")
    urls = {
        "sqlite": f"sqlite:///{tmp_path / 'headline.sqlite'}",
        "postgresql": _fresh_pg_database(pg_base_url),
    }
    if request.getfixturevalue("mariadb_server") is not None:  # (CI: must be)
        urls["mariadb"] = fresh_mariadb_database(request)
    engines = {db: create_engine(url) for db, url in urls.items()}
    try:
        for eng in engines.values():
            metadata.create_all(eng, tables=[table(PqHeadline), run_log, ticks])
        procs: dict[str, list[subprocess.Popen[bytes]]] = {db: [] for db in urls}
        logs: dict[str, list[Path]] = {db: [] for db in urls}
        started = time.monotonic()
        try:
            for i in range(WORKERS_PER_DB):
                for db, url in urls.items():
                    log = tmp_path / f"{db}-worker{i}.log"
                    procs[db].append(start_worker(url, "tests.models_periodic:PqHeadline", log=log))
                    logs[db].append(log)
            deadline = started + HEADLINE_SPAN + 150
            while True:
                dead = [
                    (db, i, p.returncode)
                    for db, ps in procs.items()
                    for i, p in enumerate(ps)
                    if p.poll() is not None
                ]
                assert not dead, f"workers died (db, index, exit): {dead}\n" + _tails(logs)
                spans = {db: _tick_span(eng) for db, eng in engines.items()}
                if all(s >= HEADLINE_SPAN for s in spans.values()):
                    break
                assert time.monotonic() < deadline, f"seconds of ticks so far: {spans}"
                time.sleep(1)
        finally:
            codes = {db: stop_workers(ps) for db, ps in procs.items()}
        elapsed = time.monotonic() - started
        outputs = {db: [p.read_text() for p in paths] for db, paths in logs.items()}
        for db in urls:
            assert codes[db] == [0] * WORKERS_PER_DB, f"{db} exit codes {codes[db]}\n" + _tails(
                logs
            )
            for out in outputs[db]:
                assert "Traceback" not in out, out[-3000:]
                assert " ERROR " not in out, out[-3000:]
        print(f"\nheadline: {elapsed:.0f}s wall, {len(urls)} x {WORKERS_PER_DB} worker processes")
        for db, eng in engines.items():
            _check_one_task_per_tick(db, eng, procs[db], outputs[db])
    finally:
        for eng in engines.values():
            eng.dispose()


def _tick_span(engine: Engine) -> float:
    t = table(PqHeadline)
    with engine.connect() as conn:
        first, last = conn.execute(select(func.min(t.c.tick), func.max(t.c.tick))).one()
    if first is None:
        return 0.0
    return (as_utc(last) - as_utc(first)).total_seconds()


def _tails(logs: dict[str, list[Path]]) -> str:
    parts = []
    for db, paths in logs.items():
        for i, path in enumerate(paths):
            text = path.read_text() if path.exists() else ""
            parts.append(f"--- {db} worker {i}:\n" + "\n".join(text.splitlines()[-15:]))
    return "\n".join(parts)


def _check_one_task_per_tick(
    db: str, engine: Engine, procs: list[subprocess.Popen[bytes]], outputs: list[str]
) -> None:
    t = table(PqHeadline)
    tasks = rows(engine, PqHeadline)
    assert tasks, f"{db}: no task was created"
    missing_tick = [r.id for r in tasks if r.tick is None]
    assert not missing_tick, f"{db}: tasks without a recorded tick: {missing_tick}"
    tick_of = {r.id: as_utc(r.tick) for r in tasks}
    all_ticks = sorted(tick_of.values())
    first, last = all_ticks[0], all_ticks[-1]

    # Exactly one task per tick: none twice...
    twice = sorted(tick for tick, n in Counter(all_ticks).items() if n > 1)
    assert not twice, f"{db}: {len(twice)} ticks have more than one task: {twice[:10]}"
    # ...and none missing: as many tasks as seconds from the first tick to the last.
    assert all(tick.microsecond == 0 for tick in all_ticks), f"{db}: a tick is not on a second"
    seconds = int((last - first).total_seconds()) + 1
    expected = {first + n * SECOND for n in range(seconds)}
    missing = sorted(expected - set(all_ticks))
    lateness = [(as_utc(r.time_created) - tick_of[r.id]).total_seconds() for r in tasks]
    if missing:
        # How late the tasks around each missing tick were created, for the report.
        lag_at = {tick_of[r.id]: lag for r, lag in zip(tasks, lateness, strict=True)}
        around = [
            ", ".join(
                f"{t:%H:%M:%S} +{lag_at[t]:.2f}s"
                for t in sorted(lag_at)
                if abs(t - m) <= 3 * SECOND
            )
            for m in missing[:5]
        ]
        raise AssertionError(
            f"{db}: {len(missing)} ticks have no task: {missing[:10]}; "
            f"tasks around them (tick +lateness): {around}"
        )
    assert len(tasks) == seconds
    assert seconds > HEADLINE_SPAN, f"{db}: only {seconds} ticks"

    # No task before its tick (ticks are computed on the database's clock).
    early = [(r.id, lag) for r, lag in zip(tasks, lateness, strict=True) if lag < 0]
    assert not early, f"{db}: tasks created before their tick: {early[:10]}"

    # alchq_ticks: the latest tick's row is there, and every row left has its task
    # (a tick's row and its task are committed together). Old rows may be pruned.
    with engine.connect() as conn:
        kept = {as_utc(v) for v in conn.scalars(select(ticks.c.tick))}
    assert last in kept, f"{db}: alchq_ticks lacks the latest tick {last}"
    orphans = sorted(kept - set(all_ticks))
    assert not orphans, f"{db}: tick rows without a task: {orphans[:10]}"

    # Every task processed exactly once by the workers. A task created just
    # before the SIGTERMs may not have been claimed yet: drain those here.
    worker_pids = {p.pid for p in procs}
    leftover = [r for r in tasks if r.status == Status.PENDING]
    late_left = [r.id for r in leftover if tick_of[r.id] < last - 10 * SECOND]
    assert not late_left, f"{db}: tasks the workers never claimed: {late_left}"
    unfinished = [(r.id, r.status) for r in tasks if r.status not in (Status.PENDING, "PROCESSED")]
    assert not unfinished, f"{db}: {unfinished}"
    drained = Worker(PqHeadline, engine=engine, scheduler=False).process_all()
    assert drained == len(leftover)
    with engine.connect() as conn:
        statuses = Counter(conn.scalars(select(t.c.status)))
        attempts: dict[int, int] = dict(conn.execute(select(t.c.id, t.c.alchq_attempts)).all())
    assert statuses == {Status.PROCESSED: len(tasks)}, f"{db}: {statuses}"
    again = sorted(i for i, n in attempts.items() if n != 1)
    # What the workers said of those tasks, for the report.
    said = [
        line
        for out in outputs
        for line in out.splitlines()
        if any(re.search(rf"PqHeadline {i}\b", line) for i in again[:3])
    ]
    assert not again, f"{db}: tasks claimed more than once: {again[:10]}\n" + "\n".join(said)
    logged = runs(engine, PqHeadline)
    assert len(logged) == len(tasks)
    assert {r.task_id for r in logged} == set(tick_of)  # exactly once: none twice, none lost
    leftover_ids = {r.id for r in leftover}
    by_others = [r for r in logged if r.task_id not in leftover_ids and r.pid not in worker_pids]
    assert not by_others, f"{db}: runs by unknown processes: {by_others[:5]}"

    # The workers' log lines agree with the database; who created what.
    creators: Counter[int] = Counter()
    logged_ticks: dict[int, datetime] = {}
    for index, out in enumerate(outputs):
        for line in out.splitlines():
            match = CREATED.search(line)
            if match and match.group(1) == "PqHeadline":
                assert match.group(3) == "* * * * * *", line
                task_id = int(match.group(2))
                assert task_id not in logged_ticks, f"{db}: task {task_id} logged twice"
                logged_ticks[task_id] = datetime.fromisoformat(match.group(4))
                creators[index] += 1
    assert logged_ticks == tick_of, f"{db}: log lines and task rows disagree"
    processed_by: Counter[int] = Counter(r.pid for r in logged)
    slow = [
        f"tick +{(tick_of[r.id] - first).total_seconds():.0f}s: {lag:.2f}s"
        for r, lag in zip(tasks, lateness, strict=True)
        if lag > 1
    ]
    print(
        f"{db}: {len(tasks)} ticks {first:%H:%M:%S}..{last:%H:%M:%S}, one task each; "
        f"created per worker {[creators[i] for i in range(len(outputs))]}; "
        f"processed per worker {[processed_by[p.pid] for p in procs]} (+{drained} drained); "
        f"created after its tick by: median {statistics.median(lateness) * 1000:.0f} ms, "
        f"max {max(lateness) * 1000:.0f} ms; over 1 s late: {slow or 'none'}"
    )


# -- 2. catch-up ---------------------------------------------------------------------


def test_missed_ticks_give_at_most_one_catch_up_task(tables: Engine) -> None:
    """every=1: with no worker for ~3.5 s, the next worker creates one task for the
    latest missed tick, not one per missed tick."""
    periodic = PqCatchUp.alchq_periodic[0]
    assert worker.process_all(PqCatchUp, engine=tables) >= 1
    before = task_ticks(tables, PqCatchUp)
    assert before and len(set(before)) == len(before)
    time.sleep(3.5)  # no worker: ticks are missed
    now = db_now(tables)
    missed = [
        t
        for t in (periodic.last_tick(now) - n * SECOND for n in range(10))
        if max(before) < t <= now
    ]
    assert len(missed) >= 3, f"only {missed} were missed"

    assert worker.process_all(PqCatchUp, engine=tables) >= 1
    new = sorted(set(task_ticks(tables, PqCatchUp)) - set(before))
    assert new, "the worker created no catch-up task"
    assert len(task_ticks(tables, PqCatchUp)) == len(before) + len(new)  # no tick twice
    # Only the latest missed tick (or, if a tick passed meanwhile, later ones).
    assert new[0] == max(missed) or new[0] > now, f"missed {missed}, created {new}"
    assert len([t for t in new if t <= now]) <= 1, f"missed {missed}, created {new}"
    # A tick that passed while the worker ran may have made a task after its last
    # claim: only the ticks up to now must have run.
    ran = {r.status for r in rows(tables, PqCatchUp) if as_utc(r.tick) <= now}
    assert ran == {Status.PROCESSED}, rows(tables, PqCatchUp)


def test_ticks_missed_for_years_give_one_task_and_restarts_add_none(tables: Engine) -> None:
    """The last tick handled was years ago: one task, for the latest tick, and the
    old tick row is gone. Further workers starting later create nothing more."""
    periodic = PqYearly.alchq_periodic[0]
    key = periodic.key(table(PqYearly).name)
    with tables.begin() as conn:
        conn.execute(insert(ticks).values(schedule=key, tick=datetime(2020, 1, 1, tzinfo=UTC)))
    expected = periodic.last_tick(db_now(tables))

    assert worker.process_all(PqYearly, engine=tables) == 1
    assert worker.process_all(PqYearly, engine=tables) == 0  # a restart
    Worker(PqYearly, engine=tables).process_one()  # and another

    assert task_ticks(tables, PqYearly) == [expected]
    with tables.connect() as conn:
        kept = list(conn.scalars(select(ticks.c.tick).where(ticks.c.schedule == key)))
    assert [as_utc(v) for v in kept] == [expected]
    assert len(runs(tables, PqYearly)) == 1


def test_catch_up_false_skips_a_long_missed_tick_but_not_an_on_time_one(
    tables: Engine, scheduler_log: pytest.LogCaptureFixture
) -> None:
    now = db_now(tables)
    if now - PqYearly.alchq_periodic[0].last_tick(now) < timedelta(seconds=5):
        pytest.skip("too close to New Year: the yearly tick is not late yet")
    assert worker.process_all(PqNoCatchUp, engine=tables) >= 1
    kinds = Counter(r.kind for r in rows(tables, PqNoCatchUp))
    assert kinds["yearly"] == 0, kinds
    assert kinds["secondly"] >= 1, kinds
    skipped = [r.getMessage() for r in scheduler_log.records if "skipped tick" in r.getMessage()]
    assert len(skipped) == 1, skipped
    assert "'0 0 1 1 *'" in skipped[0] and "catch_up=False" in skipped[0], skipped


def test_a_late_scheduler_cannot_create_a_tick_older_than_one_already_created(
    tables: Engine,
) -> None:
    """A scheduler reads the database clock just before a tick, then is held up (a
    lock, a pause, a frozen VM) while another creates that tick's task, later ones,
    and forgets old tick rows. The late one must not create a second task for the
    tick it read.

    The schedulers' clock readings are faked; everything else is real."""
    base = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
    clock = {"now": base}
    a, b, c = (laggard_scheduler(tables, lambda raw: clock["now"]) for _ in range(3))

    def check(scheduler: Any, seconds: float) -> None:
        clock["now"] = base + timedelta(seconds=seconds)
        scheduler.check()

    check(a, 0.2)  # creates the task of tick `base`
    check(a, 1.1)  # creates the task of tick base+1s
    check(b, 0.9)  # read the clock before base+1s, inserts after A's commit: nothing
    check(a, 7200.1)  # two hours later: creates base+2h, may forget the old tick rows
    check(c, 1.9)  # read the clock two hours ago (frozen since): nothing
    check(b, 7200.5)  # up to date: base+2h is taken

    assert task_ticks(tables, PqLaggard) == [base, base + SECOND, base + timedelta(hours=2)]


def test_a_stalled_scheduler_fills_in_the_ticks_it_slept_through(tables: Engine) -> None:
    """A running scheduler held up for a few ticks (a slow database, a busy machine)
    still creates each of them; one frozen for longer than late_after creates only
    the latest tick (one catch-up), like a scheduler that was not running."""
    base = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
    clock = {"now": base}
    a = laggard_scheduler(tables, lambda raw: clock["now"])

    def check(seconds: float) -> None:
        clock["now"] = base + timedelta(seconds=seconds)
        a.check()

    check(0.2)  # tick base
    check(3.4)  # stalled through base+1s and base+2s: both filled in, then base+3s
    assert task_ticks(tables, PqLaggard) == [base + n * SECOND for n in range(4)]
    check(600.3)  # frozen for ten minutes (> late_after): only the latest tick
    assert task_ticks(tables, PqLaggard) == [
        *(base + n * SECOND for n in range(4)),
        base + 600 * SECOND,
    ]


def test_a_slow_check_does_not_make_the_next_tick_late(
    tables: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait until the next tick counts from when the database's clock was read,
    not from when the check ended: a check held up for 0.7 s (a lock, a busy CPU)
    just after a tick of a per-second schedule must not sleep another whole second,
    or the next tick would be missed."""
    base = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
    scheduler = laggard_scheduler(tables, lambda raw: base + timedelta(seconds=0.005))
    create = scheduler.create

    def slow_create(*args: Any) -> None:
        time.sleep(0.7)
        create(*args)

    monkeypatch.setattr(scheduler, "create", slow_create)
    wait = scheduler.check()
    assert task_ticks(tables, PqLaggard) == [base]
    assert wait < 0.6, f"sleeps {wait:.2f}s after a 0.7s check: the next tick comes after 0.3s"


# -- 3. several schedules, names, every=, time zones -----------------------------------


def test_two_schedules_on_one_model_create_their_own_tasks(tables: Engine) -> None:
    w = Worker(PqTwo, engine=tables, poll_interval=0.05)
    thread = threading.Thread(target=w.run, daemon=True)
    thread.start()

    def processed(kind: str) -> int:
        return sum(1 for r in rows(tables, PqTwo) if r.kind == kind and r.status == "PROCESSED")

    try:
        wait_until(
            lambda: processed("every") >= 3 and processed("cron") >= 3, 30, "3 tasks of each"
        )
    finally:
        w.stop()
        thread.join(timeout=30)
    assert not thread.is_alive()
    for kind in ("every", "cron"):
        made = task_ticks(tables, PqTwo, kind=kind)
        assert len(made) == len(set(made)), f"{kind}: a tick twice: {made}"
        assert all(t.microsecond == 0 for t in made), made
    assert {r.kind for r in rows(tables, PqTwo)} == {"every", "cron"}
    with tables.connect() as conn:
        keys = set(conn.scalars(select(ticks.c.schedule).where(ticks.c.schedule.like("pq_two:%"))))
    assert keys == {p.key("pq_two") for p in PqTwo.alchq_periodic}
    assert len(keys) == 2


def test_name_keeps_a_schedules_identity(tables: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    assert worker.process_all(PqNamed, engine=tables) == 1
    # Same name, other values: the same schedule, whose latest tick is done.
    monkeypatch.setattr(
        PqNamed, "alchq_periodic", [Periodic("0 0 1 1 *", name="yearly", values={"kind": "v2"})]
    )
    assert worker.process_all(PqNamed, engine=tables) == 0
    # No name: identified by its schedule and values, so a new one.
    monkeypatch.setattr(PqNamed, "alchq_periodic", [Periodic("0 0 1 1 *", values={"kind": "v3"})])
    assert worker.process_all(PqNamed, engine=tables) == 1
    assert worker.process_all(PqNamed, engine=tables) == 0
    assert [r.kind for r in rows(tables, PqNamed)] == ["v1", "v3"]


def test_a_single_periodic_instead_of_a_list(tables: Engine) -> None:
    assert worker.process_all(PqSingle, engine=tables) == 1
    assert worker.process_all(PqSingle, engine=tables) == 0


def test_periodic_keys() -> None:
    named = Periodic("0 0 1 1 *", name="yearly", values={"kind": "a"})
    assert named.key("t") == "t:yearly"
    assert Periodic("* * * * *", name="yearly").key("t") == "t:yearly"
    assert Periodic("0 0 1 1 *", name="yearly").key("u") == "u:yearly"
    plain = Periodic("0 0 1 1 *", values={"kind": "a"})
    assert plain.key("t") == Periodic("0 0 1 1 *", values={"kind": "a"}).key("t")
    assert plain.key("t") != Periodic("0 0 1 1 *", values={"kind": "b"}).key("t")
    assert plain.key("t") != Periodic("0 0 1 1 *", values={"kind": "a"}, timezone="Asia/Tokyo").key(
        "t"
    )
    assert len(Periodic(every=1, name="x" * 400).key("t")) == 255


def test_seconds_cron_ticks() -> None:
    p = Periodic("* * * * * */2")  # every 2 seconds
    at = datetime(2024, 1, 1, 12, 0, 3, 500000, tzinfo=UTC)
    assert p.last_tick(at) == datetime(2024, 1, 1, 12, 0, 2, tzinfo=UTC)
    assert p.next_tick(at) == datetime(2024, 1, 1, 12, 0, 4, tzinfo=UTC)
    on_tick = datetime(2024, 1, 1, 12, 0, 4, tzinfo=UTC)
    assert p.last_tick(on_tick) == on_tick
    assert p.next_tick(on_tick) == on_tick + 2 * SECOND
    every_second = Periodic("* * * * * *")
    assert every_second.last_tick(at) == datetime(2024, 1, 1, 12, 0, 3, tzinfo=UTC)
    minutely = Periodic("*/15 * * * *")
    assert minutely.last_tick(at) == datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
    assert minutely.next_tick(at) == datetime(2024, 1, 1, 12, 15, tzinfo=UTC)


@pytest.mark.parametrize("every", [1, 2.5, 0.1, 0.3, timedelta(minutes=15)])
def test_every_ticks_are_counted_from_the_epoch(every: float | timedelta) -> None:
    p = Periodic(every=every)
    step = every if isinstance(every, timedelta) else timedelta(seconds=every)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    now = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    last = p.last_tick(now)
    assert last <= now < last + step
    assert (last - epoch) % step == timedelta(0), last
    assert p.next_tick(now) == last + step
    # A tick is its own last tick, and the next one follows it by one step.
    for n in range(1, 20):
        tick = last + n * step
        assert p.last_tick(tick) == tick, (n, tick)
        assert p.next_tick(tick) == tick + step, (n, tick)


def test_cron_in_a_time_zone() -> None:
    nine = Periodic("0 9 * * *", timezone="Europe/Paris")
    summer = datetime(2024, 7, 1, 8, 30, tzinfo=UTC)  # 10:30 in Paris (UTC+2)
    assert nine.last_tick(summer) == datetime(2024, 7, 1, 7, 0, tzinfo=UTC)
    assert nine.next_tick(summer) == datetime(2024, 7, 2, 7, 0, tzinfo=UTC)
    winter = datetime(2024, 1, 15, 7, 30, tzinfo=UTC)  # 08:30 in Paris (UTC+1)
    assert nine.last_tick(winter) == datetime(2024, 1, 14, 8, 0, tzinfo=UTC)
    assert nine.next_tick(winter) == datetime(2024, 1, 15, 8, 0, tzinfo=UTC)
    # The day clocks go forward (31 March 2024): 9:00 is already UTC+2.
    assert nine.next_tick(datetime(2024, 3, 31, 0, 0, tzinfo=UTC)) == datetime(
        2024, 3, 31, 7, 0, tzinfo=UTC
    )
    assert Periodic("0 9 * * *").last_tick(summer) == datetime(2024, 6, 30, 9, 0, tzinfo=UTC)
    # A naive or non-UTC "now" means the same instant.
    tokyo = summer.astimezone(timezone(timedelta(hours=9)))
    assert nine.last_tick(tokyo) == nine.last_tick(summer)
    assert nine.last_tick(summer).tzinfo == UTC


# -- 4. bad declarations ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cron": "61 * * * *"}, "invalid cron expression"),
        ({"cron": "every minute"}, "invalid cron expression"),
        ({"cron": "* * *"}, "invalid cron expression"),
        ({}, "exactly one of cron= or every="),
        ({"cron": "* * * * *", "every": 5}, "exactly one of cron= or every="),
        ({"every": 0}, "every"),
        ({"every": -1}, "every"),
        ({"every": 1e-7}, "every"),
        ({"every": "5"}, "every"),
        ({"cron": "* * * * *", "timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"cron": "* * * * *", "values": ["kind"]}, "values"),
    ],
)
def test_bad_periodic_declarations_raise_configuration_error(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        Periodic(**kwargs)


def test_worker_refuses_an_alchq_periodic_that_is_not_periodic(tmp_path: Path) -> None:
    with pytest.raises(TaskDefinitionError, match="must hold alchq.Periodic"):
        Worker(PqNotAPeriodic, engine=create_engine(f"sqlite:///{tmp_path / 'x.sqlite'}"))


def test_alchq_run_refuses_a_schedule_with_an_unknown_column(tmp_path: Path) -> None:
    result = run_alchq(
        "run",
        "tests.models_periodic:PqUnknownColumn",
        "--database-url",
        f"sqlite:///{tmp_path / 'queue.sqlite'}",
        env=env(),
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("alchq: error: "), lines
    assert "PqUnknownColumn" in lines[0] and "'no_such_column'" in lines[0], lines


def test_a_schedule_the_database_refuses_is_logged_once_and_the_worker_goes_on(
    tables: Engine, db_url: str, tmp_path: Path
) -> None:
    """PqNotNull's tasks break a NOT NULL constraint. The worker says so once and
    keeps processing, and its other model's schedule keeps creating tasks."""
    steady = table(PqSteady)
    with tables.begin() as conn:
        conn.execute(insert(steady), [{"kind": "pre"}] * 3)
    log = tmp_path / "worker.log"
    proc = start_worker(
        db_url, "tests.models_periodic:PqNotNull", "tests.models_periodic:PqSteady", log=log
    )
    try:

        def healthy() -> bool:
            assert proc.poll() is None, log.read_text()
            done = Counter(r.kind for r in rows(tables, PqSteady) if r.status == "PROCESSED")
            return done["pre"] == 3 and done["scheduled"] >= 3

        wait_until(healthy, 40, "the pre-made tasks and 3 scheduled ones")
    finally:
        (code,) = stop_workers([proc])
    out = log.read_text()
    assert code == 0, out
    assert "Traceback" not in out, out
    complaints = [
        line
        for line in out.splitlines()
        if "alchq.scheduler" in line and (" ERROR " in line or " WARNING " in line)
    ]
    assert 1 <= len(complaints) <= 2, "\n".join(complaints)
    assert "PqNotNull: schedule 'every 1s' cannot create its task" in complaints[0], complaints
    assert "label" in complaints[0], complaints[0]  # the database's own words
    assert rows(tables, PqNotNull) == []
    with tables.connect() as conn:
        refused = conn.scalar(
            select(func.count()).select_from(ticks).where(ticks.c.schedule.like("pq_not_null:%"))
        )
    assert refused == 0  # the tick's row went with the refused task


# -- 5. burst -------------------------------------------------------------------------------


def test_burst_creates_the_latest_ticks_task_and_processes_it(tables: Engine, db_url: str) -> None:
    expected = PqYearly.alchq_periodic[0].last_tick(db_now(tables))
    args = ("run", "tests.models_periodic:PqYearly", "--database-url", db_url, "--burst")
    first = run_alchq(*args, env=env())
    assert first.returncode == 0, first.stderr
    created = [m.groups() for m in map(CREATED.search, first.stderr.splitlines()) if m]
    assert created == [("PqYearly", "1", "0 0 1 1 *", expected.isoformat())], first.stderr
    (task,) = rows(tables, PqYearly)
    assert task.status == Status.PROCESSED
    assert as_utc(task.tick) == expected
    (run,) = runs(tables, PqYearly)
    assert run.task_id == task.id and run.pid != os.getpid()

    again = run_alchq(*args, env=env())
    assert again.returncode == 0, again.stderr
    assert "created by schedule" not in again.stderr, again.stderr
    assert len(rows(tables, PqYearly)) == 1
    assert len(runs(tables, PqYearly)) == 1


# -- tables ----------------------------------------------------------------------------------


def test_create_tables_command_creates_the_ticks_table(engine: Engine, db_url: str) -> None:
    result = run_alchq(
        "create-tables", "tests.models_periodic:PqYearly", "--database-url", db_url, env=env()
    )
    assert result.returncode == 0, result.stderr
    names = set(inspect(engine).get_table_names())
    assert "pq_yearly" in names
    assert "alchq_ticks" in names, f"alchq create-tables made only {sorted(names)}"


def test_seed_form_model_puts_the_ticks_table_into_alchq_metadata(tmp_path: Path) -> None:
    """In a subprocess, so that alchq.metadata of this test run stays as it is."""
    code = textwrap.dedent(
        """
        import alchq
        from sqlalchemy import Column, Integer, create_engine
        from alchq import BaseQueue, Periodic, worker

        assert "alchq_ticks" not in alchq.metadata.tables

        class SeedPeriodicTask(BaseQueue):
            id = Column(Integer, primary_key=True)
            alchq_periodic = [Periodic("0 0 1 1 *")]

            def run(self):
                pass

        assert "alchq_ticks" in alchq.metadata.tables
        engine = create_engine("sqlite:///" + __import__("sys").argv[1])
        alchq.metadata.create_all(engine)
        print(worker.process_all(SeedPeriodicTask, engine=engine))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "seed.sqlite")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1", result.stdout


def test_tick_rows_of_other_schedules_are_left_alone(tables: Engine) -> None:
    old = datetime(2020, 1, 1, tzinfo=UTC)
    with tables.begin() as conn:
        conn.execute(insert(ticks).values(schedule="someone_else:x", tick=old))
    assert worker.process_all(PqYearly, engine=tables) == 1
    with tables.begin() as conn:
        left = conn.scalar(select(ticks.c.tick).where(ticks.c.schedule == "someone_else:x"))
        conn.execute(delete(ticks).where(ticks.c.schedule == "someone_else:x"))
    assert as_utc(left) == old
