"""What a model declares about when its tasks run: retries, snoozes, periodic tasks.

::

    class Fetch(BaseQueue, db.Model):
        id = mapped_column(Integer, primary_key=True)
        url = mapped_column(String)

        # up to 5 runs; waits of about 2, 4, 8, 16 s (±10%); only for these errors
        alchq_retry = Retry(attempts=5, delay=2, backoff=2, max_delay=600, on=(OSError,))

        # one task every 15 minutes, however many workers run
        alchq_periodic = [Periodic("*/15 * * * *", values={"url": "https://example.com"})]

        def run(self):
            if too_early():
                raise Snooze(60)   # run again in a minute; not a failure
            fetch(self.url)
"""

from __future__ import annotations

import hashlib
import random
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from croniter import croniter

from alchq.exceptions import ConfigurationError

__all__ = ["Periodic", "Retry", "Snooze"]


#: Longest delay alchq accepts (about ten years): far-future times overflow
#: some databases' date types (SQLite's strftime gives NULL past year 9999).
MAX_DELAY = 10 * 366 * 86400.0


def _seconds(value: float | timedelta, name: str) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not 0 <= seconds <= MAX_DELAY  # also refuses NaN
    ):
        raise ConfigurationError(
            f"{name} must be a number of seconds from 0 to {MAX_DELAY:.0f} "
            f"(about ten years), got {value!r}"
        )
    return float(seconds)


class Snooze(Exception):  # noqa: N818 - an instruction, not an error
    """Raise from ``run()`` to run the task again later without counting a failure.

    The task goes back to PENDING with ``run_at`` = now + ``seconds`` (on the
    database's clock); run()'s uncommitted changes are rolled back, error()
    is not called and the retry policy's attempts are not used up.
    ``alchq_attempts`` still counts the run.

    Example: ``raise Snooze(30)`` or ``raise Snooze(timedelta(minutes=5))``.
    """

    def __init__(self, seconds: float | timedelta = 0) -> None:
        self.seconds = _seconds(seconds, "Snooze seconds")
        super().__init__(f"snoozed for {self.seconds:g}s")


@dataclass(frozen=True)
class Retry:
    """A model's retry policy (``alchq_retry = Retry(...)``).

    :param attempts: runs in all, the first included (``attempts=3``: two retries).
    :param delay: seconds before the first retry.
    :param backoff: each further retry waits this many times longer.
    :param max_delay: cap on the wait, in seconds.
    :param jitter: each wait is randomly scaled by 1 ± jitter (0.1 = ±10%), so
        tasks that failed together don't all come back at the same moment.
    :param on: exception types that are retried; others fail at once.
        The default retries every ``Exception`` (not SystemExit or
        KeyboardInterrupt).

    A failed run with attempts left goes back to PENDING on the same row with
    ``run_at`` = now + wait (database clock), ``alchq_failures`` + 1 and the
    error columns filled; error() is called once, when the last attempt fails.
    """

    attempts: int = 3
    delay: float = 1.0
    backoff: float = 2.0
    max_delay: float = 3600.0
    jitter: float = 0.1
    on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise ConfigurationError(
                f"Retry attempts must be a whole number, got {self.attempts!r}"
            )
        if self.attempts < 1:
            raise ConfigurationError(f"Retry attempts must be 1 or more, got {self.attempts}")
        object.__setattr__(self, "delay", _seconds(self.delay, "Retry delay"))
        object.__setattr__(self, "max_delay", _seconds(self.max_delay, "Retry max_delay"))
        if not isinstance(self.backoff, (int, float)) or self.backoff < 1:
            raise ConfigurationError(f"Retry backoff must be a number >= 1, got {self.backoff!r}")
        if not isinstance(self.jitter, (int, float)) or not 0 <= self.jitter < 1:
            raise ConfigurationError(f"Retry jitter must be between 0 and 1, got {self.jitter!r}")
        on = self.on if isinstance(self.on, tuple) else (self.on,)
        if not on or not all(isinstance(t, type) and issubclass(t, BaseException) for t in on):
            raise ConfigurationError(f"Retry on= must be exception classes, got {self.on!r}")
        object.__setattr__(self, "on", on)

    def retries(self, exc: BaseException, failures: int) -> bool:
        """Should a run that raised ``exc`` be retried, ``failures`` runs having failed
        (this one included)?"""
        return isinstance(exc, self.on) and failures < self.attempts

    def wait(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed run (1 for the first)."""
        base = min(self.max_delay, self.delay * self.backoff ** max(0, failures - 1))
        if self.jitter:
            base *= random.uniform(1 - self.jitter, 1 + self.jitter)  # noqa: S311 - not crypto
        return min(self.max_delay, base)


@dataclass(frozen=True)
class Periodic:
    """A periodic task of a model (``alchq_periodic = [Periodic(...)]``).

    :param cron: a cron expression: 5 fields (minute hour day month weekday),
        or 6 with seconds last (``"* * * * * */10"``: every 10 s; note that
        ``"*/10 * * * * *"`` is every second of minutes :00, :10, ...).
    :param every: instead of ``cron``: seconds (or a timedelta) between ticks,
        counted from the Unix epoch.
    :param values: column values of each task created.
    :param name: identifies the schedule across workers and restarts; by
        default derived from the table, the schedule and the values. Give one
        if you may later change the schedule without wanting a new run.
    :param timezone: the cron expression's time zone (default UTC).
    :param catch_up: when ticks were missed (no worker was running), create one
        task for the latest of them (default). False: skip ticks more than
        ``late_after`` seconds late.

    Every worker serving the model runs the scheduler; each tick creates
    exactly one task, enforced by the primary key of the ``alchq_ticks`` table.
    """

    cron: str | None = None
    values: Mapping[str, Any] = field(default_factory=dict)
    every: float | timedelta | None = None
    name: str | None = None
    timezone: str = "UTC"
    catch_up: bool = True
    late_after: float = 60.0

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.every is None):
            raise ConfigurationError("Periodic needs exactly one of cron= or every=")
        if self.cron is not None and not croniter.is_valid(self.cron):
            raise ConfigurationError(f"Periodic: invalid cron expression {self.cron!r}")
        if self.every is not None:
            seconds = _seconds(self.every, "Periodic every")
            if timedelta(seconds=seconds) <= timedelta(0):  # also below 1 µs
                raise ConfigurationError("Periodic every must be more than 0 seconds")
            object.__setattr__(self, "every", seconds)
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ConfigurationError(f"Periodic: unknown time zone {self.timezone!r}") from None
        if not isinstance(self.values, Mapping):
            raise ConfigurationError("Periodic values must be a mapping of column values")
        object.__setattr__(self, "values", dict(self.values))

    @property
    def spec(self) -> str:
        return self.cron if self.cron is not None else f"every {self.every:g}s"

    def key(self, table_name: str) -> str:
        """The schedule's id in the ``alchq_ticks`` table (at most 255 characters)."""
        if self.name is not None:
            return f"{table_name}:{self.name}"[:255]
        digest = hashlib.sha256(
            repr((self.spec, self.timezone, sorted(self.values.items(), key=str))).encode()
        ).hexdigest()[:16]
        return f"{table_name}:{digest}"[:255]

    def last_tick(self, now: datetime) -> datetime:
        """The latest tick at or before ``now`` (aware, UTC)."""
        if self.every is not None:
            # Whole microseconds (timedelta arithmetic), not float seconds: with
            # every=0.1, float division put a tick at the previous step.
            step = timedelta(seconds=float(self.every))  # type: ignore[arg-type]
            epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
            return epoch + (now - epoch) // step * step
        local = now.astimezone(zoneinfo.ZoneInfo(self.timezone))
        # +1 µs: croniter's get_prev is strictly before its start.
        prev: datetime = croniter(str(self.cron), local + timedelta(microseconds=1)).get_prev(
            datetime
        )
        return prev.astimezone(timezone.utc)

    def next_tick(self, now: datetime) -> datetime:
        """The first tick after ``now`` (aware, UTC)."""
        if self.every is not None:
            step = timedelta(seconds=float(self.every))  # type: ignore[arg-type]
            return self.last_tick(now) + step
        local = now.astimezone(zoneinfo.ZoneInfo(self.timezone))
        nxt: datetime = croniter(str(self.cron), local).get_next(datetime)
        return nxt.astimezone(timezone.utc)
