"""Text from tasks, made safe to store and to log.

An exception raised by a task may carry anything: a NUL byte (PostgreSQL
refuses it in text), a lone surrogate (no database can encode it), a
``__str__`` that raises, megabytes of message, or the parameters of a failed
statement (task column values, tokens). What alchq stores on the row and
prints in its log lines goes through here first, so that no such message can
break the write that records it, nor leak what it carries.
"""

from __future__ import annotations

import re

#: Most characters kept of an error message on the row.
MAX_MESSAGE = 4_000
#: Most characters kept of a traceback on the row.
MAX_TRACEBACK = 60_000
#: Most characters of a message in a log line.
MAX_LOG = 500

# SQLAlchemy appends these to a failed statement's message: the parameters are
# task data, and the link is noise in a one-line log.
_PARAMETERS = re.compile(r"^\[parameters: .*\]$", re.MULTILINE)
_BACKGROUND = re.compile(r"^\(Background on this error at: [^)]*\)$", re.MULTILINE)
# PostgreSQL quotes column values in some DETAIL lines: keep the names, hide the values.
_FAILING_ROW = re.compile(r"Failing row contains \(.*\)")
_KEY_VALUES = re.compile(r"Key \(([^)]*)\)=\(.*?\)( already exists| is not present| conflicts)")
#: C0 controls but tab and newline, and DEL: they break terminals and some databases.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


#: Database passwords (and fragments of them) of the engines in use in this
#: process, never to be shown: a driver's message may quote a misparsed URL.
_secrets: set[str] = set()


def add_secret(secret: str | None) -> None:
    """Never show ``secret`` in a cleaned text (short ones would hide too much)."""
    if secret and len(secret) >= 3:
        _secrets.add(secret)


def clean(text: str, limit: int) -> str:
    """``text`` storable in any database: no NUL or other control characters, no lone
    surrogates, no statement parameters, no known password, at most ``limit`` characters."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "***")
    text = _PARAMETERS.sub("[parameters hidden]", text)
    text = _FAILING_ROW.sub("Failing row contains (values hidden)", text)
    text = _KEY_VALUES.sub(r"Key (\1)=(values hidden)\2", text)
    text = _BACKGROUND.sub("", text).rstrip()
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    # A lone surrogate cannot be encoded; show it escaped instead.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > limit:
        cut = len(text) - limit
        marker = f" ... [{cut} more characters]"
        text = text[: max(0, limit - len(marker))] + marker
    return text


def message(exc: BaseException, limit: int = MAX_MESSAGE) -> str:
    """``str(exc)``, cleaned; a placeholder when its ``__str__`` itself fails."""
    try:
        text = str(exc)
    except Exception as err:
        text = f"<{type(exc).__name__}.__str__ failed: {type(err).__name__}>"
    return clean(text, limit)


def type_name(exc: BaseException) -> str:
    """The exception's class, ``module.Qualname`` (builtins without module), cleaned."""
    cls = type(exc)
    module = getattr(cls, "__module__", None)
    qualname = getattr(cls, "__qualname__", None) or cls.__name__
    name = qualname if module in (None, "builtins") else f"{module}.{qualname}"
    return clean(str(name), 255)


def traceback_text(text: str | None, limit: int = MAX_TRACEBACK) -> str:
    """A formatted traceback, cleaned; the head and the tail when it is too long."""
    if not text:
        return ""
    text = clean(text, len(text) + 1)  # no length cut yet: keep both ends below
    if len(text) <= limit:
        return text
    half = (limit - 100) // 2
    cut = len(text) - 2 * half
    return f"{text[:half]}\n... [{cut} characters cut] ...\n{text[-half:]}"


def one_line(text: str, limit: int = MAX_LOG) -> str:
    """The first line of ``text``, cleaned and short: for a log line."""
    first = text.strip().splitlines()
    return clean(first[0] if first else "", limit)


def describe(exc: BaseException) -> str:
    """``Type: message`` in one short line, for a log line."""
    return f"{clean(type(exc).__name__, 100)}: {one_line(message(exc, MAX_LOG * 2))}"
