"""Small helpers for messages: URLs without passwords, one-line errors."""

from __future__ import annotations

from sqlalchemy import Engine


def safe_url(engine: Engine) -> str:
    """The engine's URL with its password masked: safe to log."""
    return engine.url.render_as_string(hide_password=True)


def first_line(exc: BaseException) -> str:
    """The first line of a (driver) error's message."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__
