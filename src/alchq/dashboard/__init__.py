"""The alchq dashboard: a Flask blueprint of HTML pages and a JSON API, inside your app.

Mount it with one line, giving it who may read and who may act::

    from alchq.dashboard import Dashboard
    from alchq.flask import Alchq

    app.config["SECRET_KEY"] = ...          # sessions and CSRF tokens need it
    Alchq(app, dashboard=Dashboard(
        can_read=lambda request: current_user.is_authenticated,
        can_act=lambda request: current_user.is_admin,
    ))

or, without the extension, ``Dashboard(...).init_app(app)`` (the same as
``app.register_blueprint(Dashboard(...).blueprint)``). It serves at ``/alchq``
(``url_prefix=``); ``/alchq/api/...`` is the same data as JSON.

Security:

- It refuses to serve (403 on every URL, with a line saying how to fix it)
  until it is given ``can_read`` and/or ``can_act``: callables that get the
  request and return whether it may read the pages, or retry, cancel and
  delete tasks. ``allow_unauthenticated=True`` serves without checks, for
  local development only, and every page says so.
- Without ``can_act`` (or with ``read_only=True``) actions are hidden and
  refused. Every action is a POST checked with Flask-WTF's CSRF tokens.
- Task values are escaped by Jinja's autoescape; the JSON API escapes ``<``,
  ``>`` and ``&`` too. ``hidden_columns={MyTask: ["api_key"]}`` shows those
  columns as ``••••``.
- No CDN: its scripts, styles and chart library (uPlot, MIT) are package data.

The data comes from :mod:`alchq.monitoring` through Flask-SQLAlchemy's
``db.session`` (or ``session_factory=``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from flask import Blueprint, Flask
from sqlalchemy.orm import Session

from alchq.dashboard._settings import HIDDEN, Check, DashboardSettings, mapped_task_models
from alchq.dashboard._views import build_blueprint
from alchq.model import BaseQueue

__all__ = ["HIDDEN", "Dashboard", "mapped_task_models"]


class Dashboard(DashboardSettings):
    """The dashboard: a Flask blueprint (``.blueprint``) and its settings.

    :param models: the task models to show; None (default) shows every mapped
        BaseQueue model, found when a page is asked for.
    :param can_read: ``fn(request) -> bool``: may this request see the pages?
        Without it, ``can_act`` decides.
    :param can_act: ``fn(request) -> bool``: may it retry, cancel and delete?
        Without it, actions are hidden and refused.
    :param read_only: hide and refuse every action, whatever ``can_act`` says.
    :param hidden_columns: ``{Model or "Model": ["column", ...]}``: shown as ``••••``.
    :param url_prefix: where it is mounted.
    :param allow_unauthenticated: serve without any check (local development only;
        every page then carries a banner saying so).
    :param session_factory: makes the session to read with; default: the app's
        Flask-SQLAlchemy ``db.session``.
    :param name: the blueprint's name (mount two dashboards with two names).

    Example::

        Dashboard(can_read=is_staff, can_act=is_admin,
                  hidden_columns={Export: ["token"]}).init_app(app)
    """

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
        super().__init__(
            models=models,
            can_read=can_read,
            can_act=can_act,
            read_only=read_only,
            hidden_columns=hidden_columns,
            url_prefix=url_prefix,
            allow_unauthenticated=allow_unauthenticated,
            session_factory=session_factory,
            name=name,
        )
        self.blueprint: Blueprint = build_blueprint(self)

    def init_app(self, app: Flask) -> None:
        """Register the blueprint on ``app`` (what ``Alchq(app, dashboard=...)`` calls)."""
        app.register_blueprint(self.blueprint)
