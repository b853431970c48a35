"""Worker settings: one object, filled in a documented order, validated once.

Order (first wins): arguments given in code or on the command line, then
``ALCHQ_*`` environment variables, then the Flask app's config (``ALCHQ_*``
keys), then the defaults below.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from typing import Any

from alchq.exceptions import ConfigurationError

DAY = 86_400.0


@dataclass(frozen=True)
class Settings:
    """How a worker behaves.

    :param poll_interval: seconds an idle worker sleeps between looks for new
        tasks (``ALCHQ_POLL_INTERVAL``). Idle workers cost one cheap indexed
        query per interval.
    :param max_backoff: cap, in seconds, on the wait between retries while the
        database is unreachable (``ALCHQ_MAX_BACKOFF``).
    :param heartbeat_interval: seconds between lease renewals of the task in
        hand, from the worker's heartbeat thread (``ALCHQ_HEARTBEAT_INTERVAL``).
    :param lease: seconds a claim stays valid without a heartbeat; after that
        any live worker may put the task back (``ALCHQ_LEASE``).
    :param rescue_interval: seconds between a worker's checks for expired
        leases (``ALCHQ_RESCUE_INTERVAL``).
    :param max_lost_claims: after this many lost claims a task ends in ERROR
        with :class:`alchq.WorkerLostError` (``ALCHQ_MAX_LOST_CLAIMS``).
    :param grace_period: seconds the task in hand may take to finish after
        SIGTERM/SIGINT before it is released (``ALCHQ_GRACE_PERIOD``).
    :param kill_after: seconds a task past its time limit, or a worker past its
        grace period, may take to stop once interrupted before the process is
        replaced or exits (``ALCHQ_KILL_AFTER``).
    :param prune_processed_after: age (seconds since the task finished) after
        which PROCESSED tasks may be pruned, or None to keep them forever
        (``ALCHQ_PRUNE_PROCESSED_AFTER``; also ``7d``, ``12h``, ``never``...).
    :param prune_error_after: the same for ERROR tasks (``ALCHQ_PRUNE_ERROR_AFTER``).
    :param prune_cancelled_after: the same for CANCELLED tasks
        (``ALCHQ_PRUNE_CANCELLED_AFTER``).
    :param prune_interval: seconds between a worker's prunings, or None (also
        0 or ``off``) for none: the default (``ALCHQ_PRUNE_INTERVAL``).
    :param prune_batch_size: rows deleted per transaction when pruning
        (``ALCHQ_PRUNE_BATCH_SIZE``).
    """

    poll_interval: float = 1.0
    max_backoff: float = 5.0
    heartbeat_interval: float = 10.0
    lease: float = 60.0
    rescue_interval: float = 15.0
    max_lost_claims: float = 3
    grace_period: float = 25.0
    kill_after: float = 1.5
    prune_processed_after: float | None = 7 * DAY
    prune_error_after: float | None = 30 * DAY
    prune_cancelled_after: float | None = 7 * DAY
    prune_interval: float | None = None
    prune_batch_size: int = 1000

    def __post_init__(self) -> None:
        for name, (high, whole) in RANGES.items():
            value = getattr(self, name)
            what = "a whole number" if whole else "a number of seconds"
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not math.isfinite(value)  # NaN busy-loops, infinity overflows
                or not 0 < value <= high
                or (whole and int(value) != value)
            ):
                raise ConfigurationError(
                    f"{name} must be {what} more than 0 and at most {high:g}, got {value!r}"
                )
        if self.heartbeat_interval * 2 > self.lease:
            raise ConfigurationError(
                f"lease ({self.lease}s) must be at least twice heartbeat_interval "
                f"({self.heartbeat_interval}s), or live tasks would look lost"
            )
        # Normalised in place (timedelta or "7d" -> seconds, "never"/"off" -> None),
        # so code reading a Settings only ever sees float | None.
        for name, parse in _PRUNE_PARSERS.items():
            object.__setattr__(self, name, parse(getattr(self, name), name))
        object.__setattr__(self, "prune_batch_size", int(self.prune_batch_size))

    @classmethod
    def load(
        cls,
        overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        app_config: Mapping[str, Any] | None = None,
    ) -> Settings:
        """Build settings from overrides, environment and app config (in that order)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = "ALCHQ_" + f.name.upper()
            if overrides is not None and overrides.get(f.name) is not None:
                values[f.name] = overrides[f.name]
            elif key in environ:
                values[f.name] = _load(f.name, key, environ[key])
            elif app_config is not None and app_config.get(key) is not None:
                values[f.name] = _load(f.name, key, app_config[key])
        return replace(cls(), **values)


HOUR = 3_600.0
#: The range of each numeric setting: (largest value, whole numbers only). Every
#: value must be finite and more than 0; lease is also at least twice the heartbeat.
RANGES: dict[str, tuple[float, bool]] = {
    "poll_interval": (HOUR, False),
    "max_backoff": (HOUR, False),
    "heartbeat_interval": (HOUR, False),
    "lease": (7 * DAY, False),
    "rescue_interval": (DAY, False),
    "max_lost_claims": (1_000, True),
    "grace_period": (DAY, False),
    "kill_after": (HOUR, False),
    "prune_batch_size": (1_000_000, True),
}


def _load(name: str, key: str, raw: Any) -> Any:
    parse = _PRUNE_PARSERS.get(name)
    return parse(raw, key) if parse is not None else _number(key, raw)


def _number(key: str, raw: Any) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{key} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise ConfigurationError(f"{key} must be a finite number, got {raw!r}")
    return value


_UNITS = {"s": 1.0, "m": 60.0, "h": 3_600.0, "d": DAY, "w": 7 * DAY}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhdw]?)", re.IGNORECASE)
#: Longer ages are surely typos; they would also overflow some databases' intervals.
_MAX_AGE = 100 * 365 * DAY
AGE_HELP = "an age such as 90s, 15m, 12h, 7d, 2w or 3600 (seconds), 0 (all), or never"


def parse_age(value: object, name: str = "age") -> float | None:
    """A prune age in seconds, or None for "never" (keep forever).

    Accepts a ``timedelta``, a number of seconds, or text: ``90s``, ``15m``,
    ``12h``, ``7d``, ``2w``, ``3600`` or ``never``. ``0`` means every
    finished task, whatever its age ("older than 0 seconds"); ``never`` keeps them.
    """
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == "never":
        return None
    seconds = _seconds(value)
    if seconds is None or not 0 <= seconds <= _MAX_AGE:
        raise ConfigurationError(f"{name} must be {AGE_HELP}; got {value!r}")
    return seconds


def parse_interval(value: object, name: str = "interval") -> float | None:
    """Seconds between runs of a periodic job, or None when it is off (0, ``off``)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "off"):
        return None
    seconds = _seconds(value)
    if seconds == 0:
        return None
    if seconds is None or not 0 < seconds <= _MAX_AGE:
        raise ConfigurationError(
            f"{name} must be a number of seconds (or 30s, 15m, 1h...), "
            f"or 0 or off for none; got {value!r}"
        )
    return seconds


def _seconds(value: object) -> float | None:
    """``value`` in seconds, or None if it is not a finite duration."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value.strip())):
        seconds = float(match[1]) * _UNITS[(match[2] or "s").lower()]
    else:
        return None
    return seconds if math.isfinite(seconds) else None


#: Prune settings: how each is read and checked (they may say "never"/"off").
_PRUNE_PARSERS: dict[str, Callable[[object, str], float | None]] = {
    "prune_processed_after": parse_age,
    "prune_error_after": parse_age,
    "prune_cancelled_after": parse_age,
    "prune_interval": parse_interval,
}
