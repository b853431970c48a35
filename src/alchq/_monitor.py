"""The worker's second thread: heartbeats, time limits and last-resort stops.

It runs beside the thread that runs tasks and does not depend on ``run()``
yielding: it renews the lease of the task in hand on its own connection,
interrupts a task past its time limit, and, when a task cannot be
interrupted, stops the worker process itself. Idle, it sleeps on a condition
and costs nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, Table

from alchq._dialects import Dialect, utc_now
from alchq._dialects.base import Claim
from alchq._util import first_line

if TYPE_CHECKING:
    from alchq.model import BaseQueue

logger = logging.getLogger("alchq.worker")

#: How often the monitor looks at the task in hand (seconds).
_TICK = 0.1


@dataclass
class InHand:
    """The task a worker holds: what the monitor needs to keep or end its claim."""

    model: type[BaseQueue]
    claim: Claim
    table: Table
    engine: Engine
    dialect: Dialect
    label: str
    time_limit: float
    thread_id: int
    started: float = field(default_factory=time.monotonic)
    #: True only while ``run()`` itself executes: interrupts are raised only then.
    in_run: bool = False
    #: "timeout" or "shutdown" once the task was asked to stop.
    interrupt: str | None = None
    #: monotonic time after which the monitor stops the process itself.
    hard_deadline: float | None = None
    lost: bool = False
    #: failed runs before this one (for the retry policy).
    failures: int = 0


class Monitor:
    """Background thread of one :class:`alchq.worker.Worker`."""

    def __init__(
        self,
        heartbeat: Callable[[InHand], bool],
        heartbeat_interval: float,
        on_time_limit: Callable[[InHand], None],
        on_hard_deadline: Callable[[InHand], None],
    ) -> None:
        self._heartbeat = heartbeat
        self._interval = heartbeat_interval
        self._on_time_limit = on_time_limit
        self._on_hard_deadline = on_hard_deadline
        self._cond = threading.Condition()
        self._hand: InHand | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="alchq-monitor", daemon=True)
            self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None

    def hold(self, hand: InHand) -> None:
        with self._cond:
            self._hand = hand
            self._cond.notify_all()

    def drop(self, hand: InHand) -> None:
        with self._cond:
            if self._hand is hand:
                self._hand = None
            self._cond.notify_all()

    @property
    def hand(self) -> InHand | None:
        return self._hand

    def _main(self) -> None:
        next_beat = 0.0
        current: InHand | None = None
        failing = False
        while True:
            with self._cond:
                while self._hand is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                hand = self._hand
                assert hand is not None
                if hand is not current:
                    # The claim set the lease; the first renewal is due one interval later.
                    current, next_beat = hand, time.monotonic() + self._interval
                self._cond.wait(_TICK)
                if self._hand is not hand:
                    continue
            now = time.monotonic()
            try:
                if hand.hard_deadline is not None and now >= hand.hard_deadline:
                    self._on_hard_deadline(hand)
                elif (
                    hand.interrupt is None
                    and not hand.lost
                    and now - hand.started >= hand.time_limit
                ):
                    self._on_time_limit(hand)
                if now >= next_beat and self._hand is hand:
                    next_beat = now + self._interval
                    if not self._heartbeat(hand) and self._hand is hand and not hand.lost:
                        # The outcome write will be refused and say so; one warning is enough.
                        hand.lost = True
                        logger.debug("%s: lease renewal refused, claim lost", hand.label)
                    failing = False
            except Exception as exc:  # the monitor must outlive any one failure
                # The task's own thread reports a database outage; say it once here.
                log = logger.debug if failing else logger.warning
                log("%s: heartbeat failed: %s", hand.label, first_line(exc))
                failing = True


def interrupt_thread(thread_id: int, exc_type: type[BaseException]) -> None:
    """Raise ``exc_type`` in another thread at its next Python instruction."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc_type)
    )


def send_alarm(thread_id: int) -> None:
    """Deliver SIGALRM to the main thread (wakes it from sleeps and blocking calls)."""
    signal.pthread_kill(thread_id, signal.SIGALRM)


def replace_process() -> None:
    """Start this worker anew in the same process (same pid, same command line)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    os.execv(sys.executable, argv)  # noqa: S606 - re-running our own command line


def exit_now(code: int) -> None:
    """Leave at once, without running Python cleanup (the main thread is stuck)."""
    for handler in logging.getLogger().handlers + logging.getLogger("alchq").handlers:
        try:
            handler.flush()
        except Exception:  # noqa: S110 - best effort while exiting
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def lease_values(lease: float) -> dict[str, Any]:
    return {"alchq_lease_until": utc_now(lease)}
