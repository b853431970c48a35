"""The dashboard through Flask's test client, on real SQLite and PostgreSQL databases.

Access (403 without checks or with a refusing check, the opt-out banner),
CSRF on every action, actions read back from the database, escaping, hidden
columns, read-only mode, a missing SECRET_KEY and 404s. The browser tests
(test_dashboard_browser.py) drive the same app in Chromium.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask, Request
from flask.testing import FlaskClient
from sqlalchemy import Engine, Integer, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alchq import ConfigurationError
from alchq.dashboard import HIDDEN, Dashboard, mapped_task_models
from tests.dashboard_app import (
    DashTask,
    OtherTask,
    add_rows,
    create_app,
    database,
    db,
    dispose,
)

SCRIPT = "<script>alert(1)</script>"
BANNER = "Authentication is off: local development only"

MakeApp = Callable[..., Flask]


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    with database(db_url) as eng:
        yield eng


@pytest.fixture
def make_app(db_url: str, engine: Engine) -> Iterator[MakeApp]:
    """Builds dashboard apps on the test's database; disposes of their engines."""
    apps: list[Flask] = []

    def make(**kwargs: Any) -> Flask:
        app = create_app(db_url, **kwargs)
        apps.append(app)
        return app

    yield make
    for app in apps:
        dispose(app)


def allow(_request: Request) -> bool:
    return True


def deny(_request: Request) -> bool:
    return False


def statuses(engine: Engine, model: Any) -> dict[int, str]:
    table = model.__table__
    with engine.connect() as conn:
        return {row.id: str(row.status) for row in conn.execute(select(table.c.id, table.c.status))}


def csrf_token(client: FlaskClient) -> str:
    """The token a page hands its forms (the session cookie stays in the client)."""
    page = client.get("/alchq/").get_data(as_text=True)
    found = re.search(r'<meta name="csrf-token" content="([^"]+)"', page)
    assert found, "no CSRF token in the page"
    return found.group(1)


# -- access ---------------------------------------------------------------------------


def test_no_check_refuses_every_url_and_says_how(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="alchq.dashboard"):
        client = make_app().test_client()
    assert any("can_read" in r.getMessage() for r in caplog.records), "no warning at mount"
    for url in (
        "/alchq/",
        "/alchq/tasks",
        "/alchq/tasks/DashTask/1",
        "/alchq/workers",
        "/alchq/api/overview",
        "/alchq/static/alchq.js",
    ):
        response = client.get(url)
        assert response.status_code == 403, url
        assert "can_read" in response.get_data(as_text=True)
    assert client.post("/alchq/bulk", data={"action": "delete"}).status_code == 403


def test_can_read_false_is_forbidden(make_app: MakeApp) -> None:
    client = make_app(can_read=deny, can_act=allow).test_client()
    assert client.get("/alchq/").status_code == 403
    assert client.get("/alchq/api/overview").status_code == 403


def test_a_request_is_checked_each_time(make_app: MakeApp) -> None:
    """The check sees the request: a header decides here."""
    client = make_app(can_read=lambda r: r.headers.get("X-Staff") == "yes").test_client()
    assert client.get("/alchq/").status_code == 403
    assert client.get("/alchq/", headers={"X-Staff": "yes"}).status_code == 200


def test_opt_out_serves_with_a_banner_on_every_page(make_app: MakeApp, engine: Engine) -> None:
    add_rows(engine, DashTask, [{"id": 1, "note": "a"}])
    client = make_app(allow_unauthenticated=True).test_client()
    for url in (
        "/alchq/",
        "/alchq/tasks",
        "/alchq/tasks?model=OtherTask&status=ERROR",
        "/alchq/tasks/DashTask/1",
        "/alchq/workers",
        "/alchq/tasks/DashTask/999",  # the 404 page too
    ):
        response = client.get(url)
        assert response.status_code in (200, 404), url
        assert BANNER in response.get_data(as_text=True), url


def test_checks_given_no_banner(make_app: MakeApp) -> None:
    page = make_app(can_read=allow, can_act=allow).test_client().get("/alchq/")
    assert page.status_code == 200
    assert BANNER not in page.get_data(as_text=True)


def test_missing_secret_key_is_a_clear_error(make_app: MakeApp) -> None:
    client = make_app(secret=None, can_read=allow, can_act=allow).test_client()
    response = client.get("/alchq/")
    assert response.status_code == 500
    text = response.get_data(as_text=True)
    assert "SECRET_KEY" in text
    assert "Traceback" not in text


# -- actions and CSRF -------------------------------------------------------------------


def error_row(key: int, **extra: Any) -> dict[str, Any]:
    row = {
        "id": key,
        "note": "failed",
        "status": "ERROR",
        "alchq_attempts": 1,
        "alchq_failures": 1,
        "alchq_error_type": "ValueError",
        "alchq_error_message": "asked to fail",
    }
    row.update(extra)
    return row


def test_post_without_csrf_token_is_refused(make_app: MakeApp, engine: Engine) -> None:
    add_rows(engine, DashTask, [error_row(1)])
    client = make_app(can_read=allow, can_act=allow).test_client()
    csrf_token(client)  # a session exists: only the token is missing
    assert client.post("/alchq/tasks/DashTask/1/retry").status_code == 400
    assert client.post("/alchq/tasks/DashTask/1/retry", data={"csrf_token": "x"}).status_code == 400
    refused = client.post("/alchq/api/bulk", data={"model": "DashTask", "action": "retry"})
    assert refused.status_code == 400
    assert "CSRF" in refused.get_json()["error"]
    assert statuses(engine, DashTask) == {1: "ERROR"}


def test_retry_with_token_makes_the_row_pending(make_app: MakeApp, engine: Engine) -> None:
    add_rows(engine, DashTask, [error_row(1), error_row(2)])
    client = make_app(can_read=allow, can_act=allow).test_client()
    response = client.post("/alchq/tasks/DashTask/1/retry", data={"csrf_token": csrf_token(client)})
    assert response.status_code == 302
    assert statuses(engine, DashTask) == {1: "PENDING", 2: "ERROR"}
    # The JSON API takes the token as a header.
    api = client.post(
        "/alchq/api/tasks/DashTask/2/retry", headers={"X-CSRFToken": csrf_token(client)}
    )
    assert api.status_code == 200, api.get_data(as_text=True)
    assert statuses(engine, DashTask) == {1: "PENDING", 2: "PENDING"}


def test_an_action_the_status_forbids_is_refused(make_app: MakeApp, engine: Engine) -> None:
    add_rows(engine, DashTask, [{"id": 1, "note": "waiting"}])
    client = make_app(can_read=allow, can_act=allow).test_client()
    response = client.post(
        "/alchq/api/tasks/DashTask/1/retry", headers={"X-CSRFToken": csrf_token(client)}
    )
    assert response.status_code == 409
    assert "PENDING" in response.get_json()["error"]
    assert statuses(engine, DashTask) == {1: "PENDING"}


def test_bulk_cancel_by_filter_changes_exactly_those_rows(
    make_app: MakeApp, engine: Engine
) -> None:
    add_rows(
        engine,
        DashTask,
        [{"id": i, "note": "waiting"} for i in range(1, 8)]
        + [error_row(8), {"id": 9, "note": "done", "status": "PROCESSED"}],
    )
    add_rows(engine, OtherTask, [{"id": 1, "payload": "waiting"}])
    client = make_app(can_read=allow, can_act=allow).test_client()
    response = client.post(
        "/alchq/bulk",
        data={
            "csrf_token": csrf_token(client),
            "model": "DashTask",
            "status": "PENDING",
            "action": "cancel",
        },
    )
    assert response.status_code == 302
    expected = {i: "CANCELLED" for i in range(1, 8)} | {8: "ERROR", 9: "PROCESSED"}
    assert statuses(engine, DashTask) == expected
    assert statuses(engine, OtherTask) == {1: "PENDING"}
    page = client.get(response.headers["Location"]).get_data(as_text=True)
    assert "7 DashTask tasks cancelled." in page


def test_bulk_by_the_api_reports_its_count(make_app: MakeApp, engine: Engine) -> None:
    add_rows(engine, DashTask, [error_row(i) for i in range(1, 4)] + [{"id": 4, "note": "x"}])
    client = make_app(can_read=allow, can_act=allow).test_client()
    response = client.post(
        "/alchq/api/bulk",
        data={"model": "DashTask", "status": "ERROR", "action": "delete"},
        headers={"X-CSRFToken": csrf_token(client)},
    )
    assert response.get_json()["count"] == 3
    assert statuses(engine, DashTask) == {4: "PENDING"}


@pytest.mark.parametrize(
    "settings",
    [
        {"can_read": allow, "can_act": allow, "read_only": True},
        {"can_read": allow},  # no can_act: read-only
        {"can_read": allow, "can_act": deny},
    ],
    ids=["read_only", "no_can_act", "can_act_false"],
)
def test_read_only_hides_and_refuses_actions(
    make_app: MakeApp, engine: Engine, settings: dict[str, Any]
) -> None:
    add_rows(engine, DashTask, [error_row(1)])
    client = make_app(**settings).test_client()
    for url in ("/alchq/tasks?model=DashTask", "/alchq/tasks/DashTask/1"):
        page = client.get(url).get_data(as_text=True)
        assert "data-action=" not in page, url
        assert "bulk-form" not in page, url
    token = csrf_token(client)
    assert (
        client.post("/alchq/tasks/DashTask/1/retry", data={"csrf_token": token}).status_code == 403
    )
    bulk = {"csrf_token": token, "model": "DashTask", "action": "delete"}
    assert client.post("/alchq/bulk", data=bulk).status_code == 403
    assert statuses(engine, DashTask) == {1: "ERROR"}


def test_actions_are_shown_when_allowed(make_app: MakeApp, engine: Engine) -> None:
    add_rows(engine, DashTask, [error_row(1)])
    page = make_app(can_read=allow, can_act=allow).test_client().get("/alchq/tasks/DashTask/1")
    assert 'data-action="retry"' in page.get_data(as_text=True)


# -- what is shown ------------------------------------------------------------------------


def test_overview_counts(make_app: MakeApp, engine: Engine) -> None:
    add_rows(
        engine,
        DashTask,
        [{"id": i, "note": "w"} for i in range(1, 4)] + [error_row(4), error_row(5)],
    )
    data = make_app(can_read=allow).test_client().get("/alchq/api/overview").get_json()
    dash = next(m for m in data["models"] if m["name"] == "DashTask")
    assert dash["counts"]["PENDING"] == 3
    assert dash["counts"]["ERROR"] == 2
    assert dash["ready"] == 3
    assert len(dash["throughput"]) == 60
    assert [m["name"] for m in data["models"]] == ["DashTask", "OtherTask", "ProgressTask"]


def test_task_list_filters_and_pages(make_app: MakeApp, engine: Engine) -> None:
    add_rows(engine, DashTask, [error_row(i) for i in range(1, 6)] + [{"id": 6, "note": "w"}])
    client = make_app(can_read=allow).test_client()
    first = client.get("/alchq/api/tasks?model=DashTask&status=ERROR&per_page=2").get_json()
    assert first["total"] == 5 and first["pages"] == 3
    assert len(first["items"]) == 2
    assert {t["status"] for t in first["items"]} == {"ERROR"}
    last = client.get("/alchq/api/tasks?model=DashTask&status=ERROR&per_page=2&page=3").get_json()
    assert len(last["items"]) == 1
    page = client.get("/alchq/tasks?model=DashTask&status=PENDING").get_data(as_text=True)
    assert 'data-key="6"' in page
    assert 'data-key="1"' not in page


def test_script_in_a_column_is_escaped(make_app: MakeApp, engine: Engine) -> None:
    add_rows(engine, DashTask, [error_row(1, note=SCRIPT, alchq_error_message=SCRIPT)])
    client = make_app(can_read=allow).test_client()
    for url in ("/alchq/tasks/DashTask/1", "/alchq/", "/alchq/tasks?model=DashTask"):
        page = client.get(url).get_data(as_text=True)
        assert SCRIPT not in page, url
    page = client.get("/alchq/tasks/DashTask/1").get_data(as_text=True)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    response = client.get("/alchq/api/tasks/DashTask/1")
    assert response.mimetype == "application/json"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    body = response.get_data(as_text=True)
    assert "<" not in body and ">" not in body  # inert even if read as HTML
    data = json.loads(body)
    assert data["columns"]["note"] == SCRIPT
    assert data["error_message"] == SCRIPT
    overview = client.get("/alchq/api/overview").get_data(as_text=True)
    assert "<script" not in overview
    # No inline script may run: the policy allows the package's own files only.
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]


def test_hidden_columns_are_hidden(make_app: MakeApp, engine: Engine) -> None:
    add_rows(engine, DashTask, [{"id": 1, "note": "visible", "api_key": "s3cr3t-value"}])
    client = make_app(can_read=allow, hidden_columns={DashTask: ["api_key"]}).test_client()
    page = client.get("/alchq/tasks/DashTask/1").get_data(as_text=True)
    assert "s3cr3t-value" not in page
    assert HIDDEN in page and "visible" in page
    api = client.get("/alchq/api/tasks/DashTask/1")
    assert "s3cr3t-value" not in api.get_data(as_text=True)
    assert api.get_json()["columns"]["api_key"] == HIDDEN
    assert api.get_json()["columns"]["note"] == "visible"


@pytest.mark.parametrize(
    "url",
    [
        "/alchq/tasks?model=NoSuchModel",
        "/alchq/tasks/NoSuchModel/1",
        "/alchq/tasks/DashTask/999",
        "/alchq/tasks/DashTask/not-a-number",
        "/alchq/tasks?model=DashTask&status=SLEEPING",
    ],
)
def test_unknown_model_key_or_status_is_404(make_app: MakeApp, url: str) -> None:
    client = make_app(can_read=allow).test_client()
    response = client.get(url)
    assert response.status_code == 404
    assert "Not Found" in response.get_data(as_text=True)
    api = client.get(url.replace("/alchq/", "/alchq/api/", 1))
    assert api.status_code == 404
    assert api.get_json()["error"]


def test_action_on_unknown_key_is_404(make_app: MakeApp) -> None:
    client = make_app(can_read=allow, can_act=allow).test_client()
    response = client.post(
        "/alchq/api/tasks/DashTask/999/delete", headers={"X-CSRFToken": csrf_token(client)}
    )
    assert response.status_code == 404


# -- mounting --------------------------------------------------------------------------


def test_register_blueprint_and_prefix(db_url: str, engine: Engine) -> None:
    """``app.register_blueprint(Dashboard(...).blueprint)`` works too, at any prefix."""
    app = Flask(__name__)
    app.config.update(SQLALCHEMY_DATABASE_URI=db_url, SECRET_KEY="test")
    db.init_app(app)
    app.register_blueprint(
        Dashboard(models=[OtherTask], can_read=allow, url_prefix="/ops/queue").blueprint
    )
    try:
        client = app.test_client()
        page = client.get("/ops/queue/")
        assert page.status_code == 200
        assert "/ops/queue/static/alchq.css" in page.get_data(as_text=True)
        assert client.get("/alchq/").status_code == 404
    finally:
        dispose(app)


class _PlainBase(DeclarativeBase):
    pass


class _Secret(_PlainBase):
    """Mapped, single-table inheritance, not a task model (the discovery must not see it)."""

    __tablename__ = "dash_secret"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(20), default="base")
    token: Mapped[str | None] = mapped_column("tok", String(50))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "base"}


class _SecretChild(_Secret):
    __mapper_args__ = {"polymorphic_identity": "child"}


def test_hidden_columns_hold_for_subclasses_and_column_names() -> None:
    base: Any = _Secret
    child: Any = _SecretChild
    by_attribute = Dashboard(can_read=allow, hidden_columns={base: ["token"]})
    assert "token" in by_attribute.hidden_columns(child)  # a subclass's rows hold it too
    by_column = Dashboard(can_read=allow, hidden_columns={base: ["tok"]})
    assert "token" in by_column.hidden_columns(base)  # the column's own name
    with pytest.raises(ConfigurationError, match="no column 'tokn'"):
        Dashboard(can_read=allow, hidden_columns={base: ["tokn"]})


def test_models_none_finds_the_mapped_task_models() -> None:
    found = mapped_task_models()
    assert DashTask in found and OtherTask in found
    assert all(hasattr(m, "__table__") for m in found)


def test_live_polls_carry_a_fresh_csrf_token_to_those_who_may_act(make_app: MakeApp) -> None:
    actor = make_app(can_read=allow, can_act=allow).test_client()
    reader = make_app(can_read=allow).test_client()
    actor.get("/alchq/")
    token = actor.get("/alchq/api/overview").headers.get("X-CSRFToken")
    assert token
    assert reader.get("/alchq/api/overview").headers.get("X-CSRFToken") is None
