"""Worker settings: one object, filled in a documented order, validated once.

Order (first wins): arguments given in code or on the command line, then
``ALCHQ_*`` environment variables, then the Flask app's config (``ALCHQ_*``
keys), then the defaults below.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from alchq.exceptions import ConfigurationError


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
    """

    poll_interval: float = 1.0
    max_backoff: float = 5.0
    heartbeat_interval: float = 10.0
    lease: float = 60.0
    rescue_interval: float = 15.0
    max_lost_claims: float = 3
    grace_period: float = 25.0
    kill_after: float = 1.5

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigurationError(f"{f.name} must be a positive number, got {value!r}")
        if self.heartbeat_interval * 2 > self.lease:
            raise ConfigurationError(
                f"lease ({self.lease}s) must be at least twice heartbeat_interval "
                f"({self.heartbeat_interval}s), or live tasks would look lost"
            )
        if int(self.max_lost_claims) != self.max_lost_claims:
            raise ConfigurationError(
                f"max_lost_claims must be a whole number, got {self.max_lost_claims!r}"
            )

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
                values[f.name] = _number(key, environ[key])
            elif app_config is not None and app_config.get(key) is not None:
                values[f.name] = _number(key, app_config[key])
        return replace(cls(), **values)


def _number(key: str, raw: Any) -> float:
    try:
        return float(raw)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{key} must be a number, got {raw!r}") from None
