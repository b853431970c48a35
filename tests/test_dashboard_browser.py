"""The dashboard in a real headless Chromium (Playwright), served by a real Flask app.

What a user sees and does: the overview's counts, a retry click, a bulk cancel
by filter, a running task's progress advancing without a reload (a real worker
process), 403 without rights, a form POST without its CSRF token refused, and
a ``<script>`` in a task column shown as text, never run. Screenshots of the
pages land in test-output/screenshots/.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from flask import Request
from playwright.sync_api import Browser, Dialog, Page, expect
from sqlalchemy import Engine, select

from tests.browser import DESKTOP, PHONE, Served, chromium, screenshot_path
from tests.conftest import ROOT, alchq_command, worker_env
from tests.dashboard_app import (
    DashTask,
    OtherTask,
    ProgressTask,
    add_rows,
    create_app,
    database,
    dispose,
)

SCRIPT = "<script>alert(1)</script>"
WAIT_MS = 15_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One Chromium for the module's tests (each test gets its own context)."""
    with chromium() as b:
        yield b


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    with database(db_url) as eng:
        yield eng


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=DESKTOP)
    context.set_default_timeout(WAIT_MS)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def allow(_request: Request) -> bool:
    return True


def deny(_request: Request) -> bool:
    return False


@contextmanager
def serve(db_url: str, **settings: Any) -> Iterator[Served]:
    app = create_app(db_url, **settings)
    try:
        with Served(app) as served:
            yield served
    finally:
        dispose(app)


@pytest.fixture
def site(db_url: str, engine: Engine) -> Iterator[Served]:
    """The dashboard with both checks allowing, and DashTask's ``api_key`` hidden."""
    with serve(
        db_url, can_read=allow, can_act=allow, hidden_columns={DashTask: ["api_key"]}
    ) as served:
        yield served


def statuses(engine: Engine, model: Any) -> dict[int, str]:
    table = model.__table__
    with engine.connect() as conn:
        return {r.id: str(r.status) for r in conn.execute(select(table.c.id, table.c.status))}


def error_row(key: int, **extra: Any) -> dict[str, Any]:
    now = datetime.now(timezone.utc)
    row = {
        "id": key,
        "note": f"report {key}",
        "status": "ERROR",
        "alchq_attempts": 1,
        "alchq_failures": 1,
        "alchq_started_at": now - timedelta(seconds=3),
        "alchq_finished_at": now - timedelta(seconds=1),
        "alchq_error_type": "ConnectionError",
        "alchq_error_message": "upstream timed out after 30s",
        "alchq_traceback": (
            "Traceback (most recent call last):\n"
            '  File "reports.py", line 41, in run\n'
            "    fetch(self.note)\n"
            "ConnectionError: upstream timed out after 30s"
        ),
    }
    row.update(extra)
    return row


def history(first_id: int) -> list[dict[str, Any]]:
    """An hour of finished tasks, so the chart has something to draw."""
    now = datetime.now(timezone.utc)
    rows = []
    key = first_id
    for minute in range(60):
        for n in range(2 + (minute * 7) % 6):
            finished = now - timedelta(minutes=minute, seconds=5 + n * 7)
            rows.append(
                {
                    "id": key,
                    "note": f"report {key}",
                    "api_key": "s3cr3t",
                    "status": "PROCESSED",
                    "alchq_attempts": 1,
                    "alchq_started_at": finished - timedelta(seconds=0.4 + (n % 3)),
                    "alchq_finished_at": finished,
                }
            )
            key += 1
        if minute % 9 == 4:
            failed = now - timedelta(minutes=minute, seconds=30)
            rows.append(
                error_row(
                    key,
                    alchq_started_at=failed - timedelta(seconds=2),
                    alchq_finished_at=failed,
                )
            )
            key += 1
    return rows


# -- tests ---------------------------------------------------------------------------


def test_overview_shows_the_counts_and_screenshots(
    page: Page, site: Served, engine: Engine, db_url: str
) -> None:
    pending = [{"id": i, "note": f"report {i}", "api_key": "s3cr3t"} for i in range(1, 13)]
    later = [
        {"id": i, "note": "tomorrow", "run_at": datetime.now(timezone.utc) + timedelta(days=1)}
        for i in range(13, 16)
    ]
    rows = pending + later + history(100)
    add_rows(engine, DashTask, rows)
    add_rows(engine, OtherTask, [{"id": 1, "payload": "x"}, {"id": 2, "payload": "y"}])
    errors = sum(1 for r in rows if r.get("status") == "ERROR")
    processed = sum(1 for r in rows if r.get("status") == "PROCESSED")

    page.goto(f"{site.url}/alchq/")
    card = page.locator('section.model[data-model="DashTask"]')
    expect(card.locator('[data-count="PENDING"]')).to_have_text("15")
    expect(card.locator('[data-count="ERROR"]')).to_have_text(str(errors))
    expect(card.locator('[data-count="PROCESSED"]')).to_have_text(str(processed))
    expect(card.locator('[data-field="ready"]')).to_have_text("12")
    expect(card.locator('[data-field="scheduled"]')).to_have_text("3")
    other = page.locator('section.model[data-model="OtherTask"]')
    expect(other.locator('[data-count="PENDING"]')).to_have_text("2")
    expect(page.locator('[data-total="ERROR"]')).to_have_text(str(errors))
    # The live refresh ran (it draws the charts) and keeps the same counts.
    expect(card.locator("[data-chart][data-drawn] canvas")).to_have_count(1)
    expect(page.locator("body[data-updated]")).to_have_count(1)
    expect(card.locator('[data-count="PENDING"]')).to_have_text("15")
    if not db_url.startswith("sqlite"):
        return  # one set of screenshots is enough
    page.screenshot(path=screenshot_path("overview"), full_page=True)

    page.goto(f"{site.url}/alchq/tasks?model=DashTask")
    expect(page.locator("tr[data-key]")).to_have_count(50)
    page.screenshot(path=screenshot_path("tasks"), full_page=True)

    failed = next(r["id"] for r in rows if r.get("status") == "ERROR")
    page.goto(f"{site.url}/alchq/tasks/DashTask/{failed}")
    expect(page.locator('[data-column="api_key"]')).to_have_text("••••")
    page.screenshot(path=screenshot_path("task"), full_page=True)

    phone = page.context.browser
    assert phone is not None
    context = phone.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True)
    try:
        small = context.new_page()
        small.goto(f"{site.url}/alchq/")
        expect(small.locator("[data-chart][data-drawn] canvas").first).to_be_visible()
        small.screenshot(path=screenshot_path("overview-phone"), full_page=True)
        width = small.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], f"the overview scrolls sideways on a phone ({width}px)"
    finally:
        context.close()


def test_clicking_retry_makes_the_task_pending(page: Page, site: Served, engine: Engine) -> None:
    add_rows(engine, DashTask, [error_row(1), error_row(2)])
    page.goto(f"{site.url}/alchq/tasks/DashTask/1")
    expect(page.locator(".task-head [data-field=status]")).to_have_text("ERROR")
    page.locator('.task-head button[data-action="retry"]').click()
    expect(page.locator(".flash-ok")).to_contain_text("retried")
    expect(page.locator(".task-head [data-field=status]")).to_have_text("PENDING")
    assert statuses(engine, DashTask) == {1: "PENDING", 2: "ERROR"}


def test_bulk_cancel_by_filter(page: Page, site: Served, engine: Engine) -> None:
    add_rows(
        engine,
        DashTask,
        [{"id": i, "note": "waiting"} for i in range(1, 6)]
        + [error_row(6), {"id": 7, "note": "done", "status": "PROCESSED"}],
    )
    add_rows(engine, OtherTask, [{"id": 1, "payload": "waiting"}])
    asked: list[str] = []

    def confirm(dialog: Dialog) -> None:
        asked.append(dialog.message)
        dialog.accept()

    page.on("dialog", confirm)
    page.goto(f"{site.url}/alchq/tasks?model=DashTask")
    page.locator("select[name=status]").select_option("PENDING")  # applies on change
    page.wait_for_url("**status=PENDING**")
    expect(page.locator("tr[data-key]")).to_have_count(5)
    page.locator('#bulk-form button[value="cancel"]').click()
    expect(page.locator(".flash-ok")).to_have_text("5 DashTask tasks cancelled.")
    assert asked and "Cancel every" in asked[0]
    expected = {i: "CANCELLED" for i in range(1, 6)} | {6: "ERROR", 7: "PROCESSED"}
    assert statuses(engine, DashTask) == expected
    assert statuses(engine, OtherTask) == {1: "PENDING"}


def test_progress_advances_without_reload(
    page: Page, site: Served, engine: Engine, db_url: str
) -> None:
    add_rows(engine, ProgressTask, [{"id": 1}])
    worker = subprocess.Popen(
        alchq_command(
            "run",
            "tests.dashboard_app:ProgressTask",
            "--database-url",
            db_url,
            "--burst",
            "--log-level",
            "WARNING",
        ),  # fmt: skip
        cwd=ROOT,
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        page.goto(f"{site.url}/alchq/tasks/ProgressTask/1")
        page.evaluate("window.__sameDocument = true")  # gone if the page reloads
        pct = page.locator("#progress-section [data-field=progress-pct]")
        expect(pct).to_have_text(_percent_above(0), timeout=30_000)
        first = _percent(pct.inner_text())
        expect(pct).to_have_text(_percent_above(first), timeout=WAIT_MS)
        second = _percent(pct.inner_text())
        assert second > first
        expect(page.locator("#progress-section [data-field=progress-msg]")).to_contain_text("of 24")
        expect(page.locator(".task-head [data-field=status]")).to_have_text("PROCESSING")
        assert page.evaluate("window.__sameDocument === true"), "the page was reloaded"
        # The overview shows it running, with its progress.
        page.goto(f"{site.url}/alchq/")
        running = page.locator('section.model[data-model="ProgressTask"] [data-list=running]')
        expect(running.locator('tr[data-key="1"] progress')).to_have_count(1)
    except BaseException:
        worker.kill()
        print(worker.communicate()[0])
        raise
    out, _ = worker.communicate(timeout=60)  # --burst: it ends with the task
    assert worker.returncode == 0, out
    assert statuses(engine, ProgressTask) == {1: "PROCESSED"}


def _percent(text: str) -> int:
    return int(text.rstrip("%")) if text.endswith("%") else -1


def _percent_above(floor: int) -> re.Pattern[str]:
    """A pattern matching ``N%`` for N > floor (Playwright matches text by regex)."""
    choices = "|".join(str(n) for n in range(floor + 1, 101))
    return re.compile(rf"^({choices})%$")


def test_unauthorized_request_gets_403(page: Page, db_url: str, engine: Engine) -> None:
    with serve(db_url, can_read=deny, can_act=allow) as served:
        response = page.goto(f"{served.url}/alchq/")
        assert response is not None and response.status == 403
        assert "Forbidden" in page.content()
        api = page.request.get(f"{served.url}/alchq/api/overview")
        assert api.status == 403


def test_post_without_csrf_token_is_refused(page: Page, site: Served, engine: Engine) -> None:
    add_rows(engine, DashTask, [error_row(1)])
    page.goto(f"{site.url}/alchq/tasks/DashTask/1")
    page.evaluate("document.querySelectorAll('input[name=csrf_token]').forEach(e => e.remove())")
    with page.expect_navigation() as nav:
        page.locator('.task-head button[data-action="retry"]').click()
    response = nav.value
    assert response is not None and response.status == 400
    expect(page.locator(".error-message")).to_contain_text("CSRF")
    # A script of the page (same origin, with the session cookie) but no token: refused too.
    status = page.evaluate(
        """fetch('/alchq/api/tasks/DashTask/1/retry', {method: 'POST'}).then(r => r.status)"""
    )
    assert status == 400
    assert statuses(engine, DashTask) == {1: "ERROR"}


def test_script_in_a_column_is_text_and_never_runs(
    page: Page, site: Served, engine: Engine
) -> None:
    add_rows(engine, DashTask, [error_row(1, note=SCRIPT, alchq_error_message=SCRIPT)])
    dialogs: list[str] = []

    def record(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", record)
    page.goto(f"{site.url}/alchq/tasks/DashTask/1")
    expect(page.locator('[data-column="note"]')).to_have_text(SCRIPT)
    expect(page.locator("[data-field=error_message]")).to_have_text(SCRIPT)
    # After a live refresh (which rewrites those cells) it is still text.
    expect(page.locator("body[data-updated]")).to_have_count(1)
    expect(page.locator('[data-column="note"]')).to_have_text(SCRIPT)
    page.goto(f"{site.url}/alchq/")
    expect(page.locator("body[data-updated]")).to_have_count(1)
    errors = page.locator('section.model[data-model="DashTask"] [data-list=errors]')
    expect(errors).to_contain_text(SCRIPT)
    # An alert() would have fired as the page ran its scripts, before the waits above.
    assert dialogs == []
    assert page.evaluate("document.querySelectorAll('main script').length") == 0
