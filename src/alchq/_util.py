"""Small helpers for messages: URLs without passwords, one-line errors."""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import URL, Engine, make_url

from alchq import _text

#: Query-string keys that carry a secret in some driver's URLs.
_SECRET_KEYS = frozenset({"password", "passwd", "pwd", "sslpassword", "secret", "token"})
#: ``scheme://userinfo@``, the userinfo running to the *last* ``@`` before the path
#: (an unencoded ``@`` in a password).
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)([^/?#]*)@")
_SECRET_QUERY = re.compile(
    r"([?&](?:" + "|".join(sorted(_SECRET_KEYS)) + r")=)[^&#]*", re.IGNORECASE
)


def fix_userinfo(url: URL) -> URL:
    """``url`` with an unencoded ``@`` in its password read as part of the password.

    RFC 3986 wants ``%40``, but a password pasted as is (``user:p@ss@host``) makes
    the host ``ss@host``: it would fail to connect and print half the password.
    The host is what follows the last ``@``.
    """
    host = url.host
    if not host or "@" not in host:
        return url
    extra, real_host = host.rsplit("@", 1)
    password = f"{url.password or ''}@{extra}"
    return url.set(password=password, host=real_host)


def remember_secrets(url: URL) -> None:
    """Let no cleaned message show this URL's password, nor the part of it that an
    unencoded ``@`` pushed into the host."""
    _text.add_secret(url.password if isinstance(url.password, str) else None)
    if url.host and "@" in url.host:
        _text.add_secret(url.host.rsplit("@", 1)[0])
    for key, value in url.query.items():
        if key.lower() in _SECRET_KEYS:
            _text.add_secret(value if isinstance(value, str) else None)


def safe_url(target: Engine | URL | str) -> str:
    """The URL with its password (and any secret in its query string) masked: safe to log."""
    try:
        if isinstance(target, Engine):
            url = target.url
        elif isinstance(target, URL):
            url = target
        else:
            url = make_url(target)
    except Exception:
        return mask_url_text(str(target))
    rendered = fix_userinfo(url).render_as_string(hide_password=True)
    return _SECRET_QUERY.sub(r"\1***", rendered)


def mask_url_text(text: str) -> str:
    """Mask the password of a URL given as text, even one no parser accepts."""
    match = _USERINFO.match(text)
    if match and ":" in match.group(2):
        user = match.group(2).split(":", 1)[0]
        text = f"{match.group(1)}{user}:***@{text[match.end() :]}"
    return _SECRET_QUERY.sub(r"\1***", text)


_ANY_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"]+")


def mask_urls_in(text: str) -> str:
    """``text`` with the password of every URL in it masked."""
    return _ANY_URL.sub(lambda m: mask_url_text(m.group()), text)


def first_line(exc: BaseException) -> str:
    """The first line of a (driver) error's message, cleaned and short."""
    orig = getattr(exc, "orig", None) or exc
    line = _text.one_line(_text.message(orig, _text.MAX_LOG * 2))
    return line or type(orig).__name__


def helper_thread(target: Callable[..., object], name: str, *args: Any) -> threading.Thread:
    """A daemon thread of alchq's own, started, that never takes SIGALRM.

    A process-wide SIGALRM (a supervisor's "time is up") must reach the main
    thread, where its handler interrupts the task: a signal delivered to
    another thread would not wake the main thread from a blocking call.
    """

    def main() -> None:
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        target(*args)

    thread = threading.Thread(target=main, name=name, daemon=True)
    thread.start()
    return thread
