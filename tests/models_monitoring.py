"""Task models of the monitoring tests (progress, cancel, events), served by real workers.

Tasks coordinate with the test through files named by their columns, never by sleeps
alone: a task says it started by creating its ``started`` file and waits for the test's
``go`` file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from sqlalchemy import Integer, String
from sqlalchemy.orm import Mapped, mapped_column, object_session

from alchq import BaseQueue


def _wait_for(path: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)


class MonProgress(BaseQueue):
    """Reports progress step by step; with ``write`` set, first writes its own row
    (which holds the row's lock, and on SQLite the whole file, until it ends)."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    steps: Mapped[int] = mapped_column(Integer, default=5)
    write: Mapped[int] = mapped_column(Integer, default=0)
    note: Mapped[str | None] = mapped_column(String(100))
    #: a folder: the task creates step-<i> files as it goes, waits for go-<i> files
    folder: Mapped[str | None] = mapped_column(String(500))

    def run(self) -> None:
        if self.write:
            self.note = "written by run()"
            session = object_session(self)
            assert session is not None
            session.flush()
        folder = Path(self.folder or "")
        for i in range(1, int(self.steps or 0) + 1):
            self.alchq_progress(i / self.steps, f"step {i} of {self.steps}")
            if self.folder:
                (folder / f"step-{i}").touch()
                _wait_for(str(folder / f"go-{i}"))


class MonTight(BaseQueue):
    """Calls alchq_progress in a tight loop for ``seconds``."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seconds: Mapped[int] = mapped_column(Integer, default=2)

    def run(self) -> None:
        end = time.monotonic() + self.seconds
        n = 0
        while time.monotonic() < end:
            n += 1
            self.alchq_progress(min(1.0, n / 1e9), f"call {n}")
        self.alchq_progress(1.0, "done")


class MonCancel(BaseQueue):
    """Writes its row, says it started, then runs until cancelled (or ``seconds``)."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    note: Mapped[str | None] = mapped_column(String(100))
    folder: Mapped[str | None] = mapped_column(String(500))

    def run(self) -> None:
        self.note = "written before the cancel"
        session = object_session(self)
        assert session is not None
        session.flush()
        Path(self.folder or ".", f"started-{self.id}").touch()
        end = time.monotonic() + 60
        while time.monotonic() < end:
            time.sleep(0.01)

    def error(self, exc: BaseException) -> None:
        Path(self.folder or ".", f"error-{self.id}").touch()


class MonQuick(BaseQueue):
    """Fails when ``fail`` is set, else does nothing."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fail: Mapped[int] = mapped_column(Integer, default=0)
    secret: Mapped[str | None] = mapped_column(String(100))

    def run(self) -> None:
        if self.fail:
            raise ValueError("asked to fail")
