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
    """

    poll_interval: float = 1.0
    max_backoff: float = 5.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigurationError(f"{f.name} must be a positive number, got {value!r}")

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
