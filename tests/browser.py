"""A real headless browser for the dashboard tests: the distribution's Chromium,
driven by Playwright's Python package, and a Flask app served in a thread.

Playwright's own browser builds cannot be downloaded here (never run
``playwright install``): it drives ``/usr/bin/chromium`` (Debian's ``chromium``
package; ``.ci/run`` installs it). Without it the browser tests skip, except
in CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from flask import Flask
from playwright.sync_api import Browser, ViewportSize, sync_playwright
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("ALCHQ_TEST_CHROMIUM", "/usr/bin/chromium"))
#: No sandbox (containers run as root), no GPU, and nothing that phones home.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = ROOT / "test-output" / "screenshots"

DESKTOP: ViewportSize = {"width": 1366, "height": 900}
PHONE: ViewportSize = {"width": 390, "height": 844}


def require_chromium() -> Path:
    """The browser's path; skip the test without one (fail in CI)."""
    if CHROMIUM.exists():
        return CHROMIUM
    reason = (
        f"no Chromium at {CHROMIUM}: install the distribution's package "
        "(apt-get install chromium) to run the dashboard's browser tests"
    )
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium, closed afterwards."""
    path = require_chromium()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(path), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


class _Quiet(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # the page polls every 2 s: a line per request would drown the test output


class Served:
    """A WSGI app served on a free local port by a thread (werkzeug's server)."""

    def __init__(self, app: Flask) -> None:
        self.server: BaseWSGIServer = make_server(
            "127.0.0.1", 0, app, threaded=True, request_handler=_Quiet
        )
        self.url = f"http://127.0.0.1:{self.server.port}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="dashboard-server", daemon=True
        )

    def __enter__(self) -> Served:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)


def screenshot_path(name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS / f"{name}.png"
