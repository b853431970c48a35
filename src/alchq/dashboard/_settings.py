"""The dashboard's settings and access rules (who may read, who may act, what is hidden).

Kept apart from the routes (:mod:`alchq.dashboard._views`), which read them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flask import Flask, Request
from sqlalchemy import inspect
from sqlalchemy.orm import Session

from alchq import monitoring
from alchq.exceptions import ConfigurationError
from alchq.model import BaseQueue

__all__ = ["HIDDEN", "NO_CHECKS", "DashboardSettings", "mapped_task_models"]

log = logging.getLogger("alchq.dashboard")

#: What a hidden column's value is shown as, in HTML and JSON.
HIDDEN = "••••"

#: A check: gets the request, returns whether it is allowed.
Check = Callable[[Request], bool]

NO_CHECKS = (
    "The alchq dashboard refuses to serve: it shows task data and can change it, and "
    "it was given no authorization check. Pass can_read=fn(request) -> bool (and "
    "can_act=fn(request) -> bool for retry, cancel and delete) to Dashboard(...), or "
    "allow_unauthenticated=True for local development only."
)


def mapped_task_models() -> list[type[BaseQueue]]:
    """Every usable task model imported so far (mapped, with run()), by name."""
    return monitoring.task_models()


def _check_hidden(model: type[BaseQueue], names: Iterable[str]) -> None:
    """An unknown name would show the secret it was meant to hide: refuse it at once."""
    mapper = inspect(model, raiseerr=False)
    if mapper is None:
        return
    known = {attr.key for attr in mapper.column_attrs} | {
        col.name for attr in mapper.column_attrs for col in attr.columns
    }
    unknown = sorted(set(names) - known)
    if unknown:
        raise ConfigurationError(
            f"hidden_columns: {model.__name__} has no column {', '.join(map(repr, unknown))}"
        )


class DashboardSettings:
    """The dashboard's settings and access rules; :class:`alchq.dashboard.Dashboard`
    adds the blueprint and documents the parameters."""

    def __init__(
        self,
        *,
        models: Iterable[type[BaseQueue]] | None = None,
        can_read: Check | None = None,
        can_act: Check | None = None,
        read_only: bool = False,
        hidden_columns: Mapping[type[BaseQueue] | str, Iterable[str]] | None = None,
        url_prefix: str = "/alchq",
        allow_unauthenticated: bool = False,
        session_factory: Callable[[], Session] | None = None,
        name: str = "alchq_dashboard",
    ) -> None:
        self._models = list(models) if models is not None else None
        self.can_read = can_read
        self.can_act = can_act
        self.read_only = read_only
        self._hidden: dict[str, frozenset[str]] = {}
        for key, names in (hidden_columns or {}).items():
            if isinstance(names, str):
                names = [names]  # a single column, not its letters
            if not isinstance(key, str):
                _check_hidden(key, names)
            name = key if isinstance(key, str) else key.__name__
            self._hidden[name] = self._hidden.get(name, frozenset()) | frozenset(names)
        self.url_prefix = url_prefix.rstrip("/")
        self.allow_unauthenticated = allow_unauthenticated
        self.session_factory = session_factory
        self.name = name

    def on_mount(self, app: Flask) -> None:
        """Say once, at mount, what would otherwise only show as 403 or 500 pages."""
        where = self.url_prefix or "/"
        if self.unconfigured:
            log.warning("alchq dashboard at %s: %s", where, NO_CHECKS)
        elif self.auth_off:
            log.warning(
                "alchq dashboard at %s serves without authentication "
                "(allow_unauthenticated=True): local development only",
                where,
            )
        if not app.secret_key:
            log.warning(
                "alchq dashboard at %s: the app has no SECRET_KEY yet; the dashboard "
                "refuses to serve without one (its CSRF tokens need it)",
                where,
            )

    # -- access ----------------------------------------------------------------

    @property
    def unconfigured(self) -> bool:
        """No check given and no explicit opt-out: every request is refused."""
        return self.can_read is None and self.can_act is None and not self.allow_unauthenticated

    @property
    def auth_off(self) -> bool:
        """Serving without any check (the opt-out): every page shows a banner."""
        return self.can_read is None and self.can_act is None and self.allow_unauthenticated

    def may_read(self, request: Request) -> bool:
        if self.unconfigured:
            return False
        if self.auth_off:
            return True
        check = self.can_read if self.can_read is not None else self.can_act
        assert check is not None
        return bool(check(request))

    def may_act(self, request: Request) -> bool:
        if self.read_only or self.unconfigured:
            return False
        if self.auth_off:
            return True
        if self.can_act is None:
            return False
        return self.may_read(request) and bool(self.can_act(request))

    # -- models ----------------------------------------------------------------

    def models(self) -> dict[str, type[BaseQueue]]:
        """The shown models by their URL name (class name; module-qualified if two clash)."""
        models = self._models if self._models is not None else mapped_task_models()
        names = [m.__name__ for m in models]
        return {
            (m.__name__ if names.count(m.__name__) == 1 else f"{m.__module__}.{m.__name__}"): m
            for m in models
        }

    def hidden_columns(self, model: type[BaseQueue]) -> frozenset[str]:
        """The attribute names hidden for ``model``: given for it or for any of its bases
        (a subclass's rows hold its base's secrets), by attribute or column name."""
        names: set[str] = set()
        for cls in model.__mro__:
            names |= self._hidden.get(cls.__name__, frozenset())
            names |= self._hidden.get(f"{cls.__module__}.{cls.__name__}", frozenset())
        mapper = inspect(model, raiseerr=False)
        if mapper is not None:
            for attr in mapper.column_attrs:
                if any(col.name in names for col in attr.columns):
                    names.add(attr.key)
        return frozenset(names)

    def hide(self, model: type[BaseQueue], columns: Mapping[str, Any]) -> dict[str, Any]:
        """``columns`` with the model's hidden ones replaced by :data:`HIDDEN`."""
        hidden = self.hidden_columns(model)
        return {k: (HIDDEN if k in hidden else v) for k, v in columns.items()}

    def __repr__(self) -> str:
        return f"Dashboard(url_prefix={self.url_prefix!r}, read_only={self.read_only})"
