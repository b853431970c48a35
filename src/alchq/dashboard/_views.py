"""The dashboard's routes: HTML pages, the JSON API and the actions (POST + CSRF).

Every value shown comes from :mod:`alchq.monitoring`; this module only checks
access, renders and converts to JSON.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import math
import uuid
from collections.abc import Mapping
from datetime import date, datetime, timezone
from decimal import Decimal
from typing import Any, cast

from flask import (
    Blueprint,
    Flask,
    Response,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    url_for,
)
from flask.blueprints import BlueprintSetupState
from flask_wtf.csrf import generate_csrf, validate_csrf  # type: ignore[import-untyped]
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException, NotFound
from werkzeug.wrappers import Response as BaseResponse
from wtforms.validators import ValidationError  # type: ignore[import-untyped]

from alchq import monitoring
from alchq._sessions import flask_db
from alchq.dashboard._settings import NO_CHECKS, DashboardSettings
from alchq.exceptions import AlchqError, TaskNotFoundError
from alchq.model import BaseQueue, Status

log = logging.getLogger("alchq.dashboard")

#: Tasks per page of the task list (the API accepts ``per_page`` up to MAX_PER_PAGE).
PER_PAGE = 50
MAX_PER_PAGE = 500

ACTIONS = ("retry", "cancel", "delete")

MISSING_KEY_TEXT = (
    "The alchq dashboard refuses to serve: the app has no SECRET_KEY. Its actions are "
    "protected by Flask-WTF's CSRF tokens, which are signed with it: set "
    "app.config['SECRET_KEY'] to a long random value kept out of the code."
)

#: Headers of every dashboard response: no framing, no inline script, no sniffing.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


# -- JSON -------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """``value`` as JSON-ready data (dataclasses, named tuples, times, enums, UUIDs)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        as_dict = getattr(value, "as_dict", None)
        if callable(as_dict):
            return plain(as_dict())
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return plain(value._asdict())
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(bytes(value))} bytes>"
    if isinstance(value, (Decimal, uuid.UUID)):
        return str(value)
    return str(value)


def json_response(data: Any, status: int = 200) -> Response:
    """JSON whose ``<``, ``>`` and ``&`` are escaped: inert even if read as HTML."""
    body = (
        json.dumps(plain(data), ensure_ascii=False)
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
    )
    return Response(body, status=status, mimetype="application/json")


# -- template helpers ---------------------------------------------------------------


def _as_datetime(value: Any) -> datetime | None:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return None


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = abs(seconds)
    if s < 1:
        text = "now" if seconds >= 0 else "in <1s"
        return text
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size:
            n = int(s // size)
            return f"{n}{unit} ago" if seconds >= 0 else f"in {n}{unit}"
    return "now"  # pragma: no cover - s >= 1 always finds a unit


def ago(value: Any) -> str:
    """``3m ago`` / ``in 2h`` from a time (UTC when naive)."""
    when = _as_datetime(value)
    if when is None:
        return "—"
    return _ago((datetime.now(timezone.utc) - when).total_seconds())


def duration(seconds: Any) -> str:
    if seconds is None:
        return "—"
    s = float(seconds)
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def utc(value: Any) -> str:
    when = _as_datetime(value)
    return "—" if when is None else when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso(value: Any) -> str:
    when = _as_datetime(value)
    return "" if when is None else when.isoformat()


def shown(value: Any) -> str:
    """A column's value as text (still escaped by the template)."""
    if value is None:
        return "NULL"
    data = plain(value)
    return data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)


def between(start: Any, end: Any) -> float | None:
    a, b = _as_datetime(start), _as_datetime(end)
    return None if a is None or b is None else (b - a).total_seconds()


# -- the blueprint ----------------------------------------------------------------


def build_blueprint(dash: DashboardSettings) -> Blueprint:
    bp = Blueprint(
        dash.name,
        __name__,
        url_prefix=dash.url_prefix or None,
        template_folder="templates",
        static_folder="static",
        static_url_path="/static",
    )
    name = dash.name
    session_key = f"_{name}_session"

    def _mounted(state: BlueprintSetupState) -> None:
        dash.on_mount(cast(Flask, state.app))

    bp.record_once(_mounted)

    # -- access, sessions, headers ---------------------------------------------------

    def wants_json() -> bool:
        prefix = f"{dash.url_prefix}/api/"
        return request.path.startswith(prefix)

    def refuse(status: int, message: str) -> Response:
        if wants_json():
            return json_response({"error": message}, status)
        return Response(message + "\n", status=status, mimetype="text/plain")

    @bp.before_request
    def guard() -> Response | None:
        if dash.unconfigured:
            return refuse(403, NO_CHECKS)
        if not dash.may_read(request):
            return refuse(403, "Forbidden: this request may not read the alchq dashboard.")
        if not current_app.secret_key:
            log.error("alchq dashboard: %s", MISSING_KEY_TEXT)
            return refuse(500, MISSING_KEY_TEXT)
        return None

    @bp.after_request
    def headers(response: Response) -> Response:
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        if request.endpoint != f"{name}.static":
            response.headers["Cache-Control"] = "no-store"
        if (
            request.method == "GET"
            and response.mimetype == "application/json"
            and response.status_code == 200
            and dash.may_act(request)
        ):
            # Re-signed at each poll: a page left open past the token's time limit
            # (Flask-WTF: an hour) can still act.
            response.headers["X-CSRFToken"] = generate_csrf()
        return response

    @bp.teardown_request
    def close_session(_exc: BaseException | None) -> None:
        session: Session | None = g.pop(session_key, None)
        if session is not None:
            session.close()

    def db_session() -> Session:
        if dash.session_factory is not None:
            if session_key not in g:
                setattr(g, session_key, dash.session_factory())
            made: Session = getattr(g, session_key)
            return made
        db = flask_db(current_app._get_current_object())  # type: ignore[attr-defined]  # noqa: SLF001
        if db is None:
            raise AlchqError(
                "the alchq dashboard needs a database: set up Flask-SQLAlchemy on the app "
                "(db.init_app(app)) or pass session_factory= to Dashboard(...)"
            )
        session: Session = db.session
        return session

    def model_named(model_name: str) -> type[BaseQueue]:
        model = dash.models().get(model_name)
        if model is None:
            raise NotFound(f"No task model named {model_name!r} in this dashboard.")
        return model

    def status_arg() -> Status | None:
        raw = request.values.get("status") or None
        if raw is None:
            return None
        try:
            return Status(raw.upper())
        except ValueError:
            raise NotFound(f"No status named {raw!r}.")

    def check_action(action: str) -> None:
        """Refuse an action the request may not do, or one without a valid CSRF token."""
        if action not in ACTIONS:
            raise NotFound(f"No action named {action!r}.")
        if not dash.may_act(request):
            why = "the dashboard is read-only" if dash.read_only else "this request may not act"
            raise Refused(403, f"Forbidden: {why}.")
        token = request.form.get("csrf_token") or request.headers.get("X-CSRFToken")
        try:
            validate_csrf(token)
        except ValidationError as exc:
            raise Refused(400, f"Refused: {exc.args[0] if exc.args else 'bad CSRF token'}")

    @bp.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response | BaseResponse:
        status = exc.code or 500
        message = exc.description or exc.name
        if wants_json():
            return json_response({"error": message}, status)
        return Response(
            render_template("alchq/error.html", status=status, title=exc.name, message=message),
            status=status,
        )

    @bp.errorhandler(AlchqError)
    def alchq_error(exc: AlchqError) -> Response:
        log.error("alchq dashboard: %s", exc)
        if wants_json():
            return json_response({"error": str(exc)}, 500)
        return Response(
            render_template("alchq/error.html", status=500, title="Error", message=str(exc)),
            status=500,
        )

    @bp.context_processor
    def context() -> dict[str, Any]:
        return {
            "dash": dash,
            "auth_off": dash.auth_off,
            "may_act": dash.may_act(request),
            "csrf_token": generate_csrf,
            "model_names": list(dash.models()),
            "statuses": [s.value for s in Status],
            "bp": name,
            "ago": ago,
            "utc": utc,
            "iso": iso,
            "duration": duration,
            "shown": shown,
            "between": between,
        }

    # -- data -------------------------------------------------------------------------

    def overview_data() -> dict[str, Any]:
        session = db_session()
        models: list[dict[str, Any]] = []
        for model_name, model in dash.models().items():
            try:
                stats = plain(monitoring.queue_stats(session, model))
            except SQLAlchemyError as exc:
                # One model's missing table must not take the whole overview down.
                session.rollback()
                log.warning("alchq dashboard: no stats for %s: %s", model_name, exc)
                models.append({"name": model_name, "error": _first_line(exc)})
                continue
            stats["name"] = model_name
            models.append(stats)
        return {"models": models, "now": datetime.now(timezone.utc)}

    def workers_data() -> list[Any]:
        session = db_session()
        try:
            found: list[Any] = plain(monitoring.workers(session, list(dash.models().values())))
            return found
        except SQLAlchemyError as exc:
            session.rollback()
            log.warning("alchq dashboard: no worker registry: %s", exc)
            return []

    def page_args() -> tuple[int, int]:
        try:
            page = max(1, int(request.args.get("page", "1")))
            per_page = min(MAX_PER_PAGE, max(1, int(request.args.get("per_page", PER_PAGE))))
        except ValueError:
            raise NotFound("page and per_page must be whole numbers.")
        return page, per_page

    def task_list(model_name: str) -> dict[str, Any]:
        model = model_named(model_name)
        status = status_arg()
        page, per_page = page_args()
        result = monitoring.tasks(
            db_session(), model, status=status, limit=per_page, offset=(page - 1) * per_page
        )
        return {
            "model": model_name,
            "status": status.value if status else None,
            "page": page,
            "per_page": per_page,
            "pages": max(1, math.ceil(result.total / per_page)),
            "total": result.total,
            "items": plain(result.items),
        }

    def task_detail(model_name: str, key: str) -> tuple[type[BaseQueue], Any]:
        model = model_named(model_name)
        try:
            detail = monitoring.task(db_session(), model, key)
        except TaskNotFoundError as exc:  # a key this model's primary key cannot hold
            raise NotFound(str(exc))
        if detail is None:
            raise NotFound(f"No {model_name} task with key {key!r}.")
        return model, detail

    def detail_json(model: type[BaseQueue], detail: Any) -> dict[str, Any]:
        data: dict[str, Any] = plain(detail)
        data["columns"] = dash.hide(model, data.get("columns") or {})
        return data

    def act(model_name: str, key: str, action: str) -> str:
        """Do one action; the message to show. Raises NotFound, Refused."""
        check_action(action)
        model, _ = task_detail(model_name, key)
        session = db_session()
        try:
            if action == "retry":
                monitoring.retry(session, model, key)
            elif action == "cancel":
                monitoring.cancel(session, model, key)
            else:
                monitoring.delete(session, model, key)
            session.commit()
        except TaskNotFoundError as exc:  # deleted meanwhile
            session.rollback()
            raise NotFound(str(exc))
        except AlchqError as exc:
            session.rollback()
            raise Refused(409, str(exc))
        past = {"retry": "retried", "cancel": "cancelled", "delete": "deleted"}[action]
        log.info("alchq dashboard: %s %s %s", model_name, key, past)
        return f"{model_name} {key} {past}."

    def act_in_bulk() -> tuple[str, int, str, Status | None]:
        action = request.form.get("action", "")
        check_action(action)
        model_name = request.form.get("model", "")
        model = model_named(model_name)
        status = status_arg()
        try:
            done = monitoring.bulk(db_session(), model, action, status=status)  # type: ignore[arg-type]
        except AlchqError as exc:
            db_session().rollback()
            raise Refused(409, str(exc))
        log.info(
            "alchq dashboard: bulk %s of %s (status %s): %d tasks",
            action,
            model_name,
            status or "any",
            done,
        )
        return model_name, done, action, status

    # -- pages ------------------------------------------------------------------------

    @bp.route("/")
    def overview() -> str:
        data = overview_data()
        workers = workers_data()
        return render_template(
            "alchq/overview.html",
            page="overview",
            overview=data,
            alive=sum(1 for w in workers if w.get("alive")),
            workers=len(workers),
        )

    @bp.route("/tasks")
    def tasks() -> str | BaseResponse:
        names = list(dash.models())
        model_name = request.args.get("model") or (names[0] if names else None)
        if model_name is None:
            return render_template("alchq/tasks.html", page="tasks", listing=None)
        listing = task_list(model_name)
        return render_template("alchq/tasks.html", page="tasks", listing=listing)

    @bp.route("/tasks/<model_name>/<path:key>")
    def task(model_name: str, key: str) -> str:
        model, detail = task_detail(model_name, key)
        return render_template(
            "alchq/task.html",
            page="tasks",
            model_name=model_name,
            key=key,
            task=detail,
            columns=dash.hide(model, detail.columns),
            hidden=dash.hidden_columns(model),
        )

    @bp.route("/workers")
    def workers() -> str:
        return render_template("alchq/workers.html", page="workers", workers=workers_data())

    @bp.route("/tasks/<model_name>/<path:key>/<action>", methods=["POST"])
    def task_action(model_name: str, key: str, action: str) -> BaseResponse:
        message = act(model_name, key, action)
        flash(message, "ok")
        if action == "delete":
            return redirect(url_for(f"{name}.tasks", model=model_name))
        return redirect(url_for(f"{name}.task", model_name=model_name, key=key))

    @bp.route("/bulk", methods=["POST"])
    def bulk() -> BaseResponse:
        model_name, done, action, status = act_in_bulk()
        past = {"retry": "retried", "cancel": "cancelled", "delete": "deleted"}[action]
        flash(f"{done} {model_name} task{'s' if done != 1 else ''} {past}.", "ok")
        return redirect(
            url_for(f"{name}.tasks", model=model_name, status=status.value if status else None)
        )

    # -- JSON API ---------------------------------------------------------------------

    @bp.route("/api/overview")
    def api_overview() -> Response:
        data = overview_data()
        workers = workers_data()
        data["workers"] = {
            "alive": sum(1 for w in workers if w.get("alive")),
            "total": len(workers),
        }
        return json_response(data)

    @bp.route("/api/tasks")
    def api_tasks() -> Response:
        model_name = request.args.get("model")
        if not model_name:
            raise NotFound("Give ?model=NAME (see /api/overview for the names).")
        return json_response(task_list(model_name))

    @bp.route("/api/tasks/<model_name>/<path:key>")
    def api_task(model_name: str, key: str) -> Response:
        model, detail = task_detail(model_name, key)
        return json_response(detail_json(model, detail))

    @bp.route("/api/workers")
    def api_workers() -> Response:
        return json_response({"workers": workers_data()})

    @bp.route("/api/tasks/<model_name>/<path:key>/<action>", methods=["POST"])
    def api_task_action(model_name: str, key: str, action: str) -> Response:
        return json_response({"ok": True, "message": act(model_name, key, action)})

    @bp.route("/api/bulk", methods=["POST"])
    def api_bulk() -> Response:
        model_name, done, action, status = act_in_bulk()
        return json_response(
            {
                "ok": True,
                "model": model_name,
                "action": action,
                "status": status.value if status else None,
                "count": done,
            }
        )

    @bp.errorhandler(Refused)
    def refused(exc: Refused) -> Response | BaseResponse:
        if wants_json():
            return json_response({"error": exc.message}, exc.status)
        back = request.referrer or ""
        if exc.status == 409 and back.startswith(request.host_url):
            # A task in the wrong state: say why on the page the action came from.
            flash(exc.message, "error")
            return redirect(back)
        return Response(
            render_template(
                "alchq/error.html", status=exc.status, title="Refused", message=exc.message
            ),
            status=exc.status,
        )

    return bp


class Refused(Exception):
    """An action refused: no right to act, no CSRF token, or a task in the wrong state."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
