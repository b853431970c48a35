"""The worker's second thread: heartbeats, time limits and last-resort stops.

It runs beside the thread that runs tasks and does not depend on ``run()``
yielding: it renews the lease of the task in hand on its own connection,
interrupts a task past its time limit, and, when a task cannot be
interrupted, stops the worker process itself. Idle, it sleeps on a condition
and costs nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from alchq import _selfwait as selfwait
from alchq._held import Held
from alchq._link import link
from alchq._util import first_line, helper_thread

logger = logging.getLogger("alchq.worker")

#: How often the monitor looks at the task in hand (seconds).
_TICK = 0.1


class Monitor:
    """Background thread of one worker: its heartbeat, and the time limits of the task in hand.

    The heartbeat runs every ``heartbeat_interval`` whether or not a task is in
    hand (the worker's registry row says it is alive). Time limits are checked
    every :data:`_TICK` while a task is held.
    """

    def __init__(
        self,
        heartbeat: Callable[[], None],
        heartbeat_interval: float,
        on_time_limit: Callable[[Held], None],
        on_hard_deadline: Callable[[Held], None],
        on_tick: Callable[[Held], None] | None = None,
    ) -> None:
        self._heartbeat = heartbeat
        self._interval = heartbeat_interval
        self._on_time_limit = on_time_limit
        self._on_hard_deadline = on_hard_deadline
        #: Called each tick while a task is held (its progress, cancel requests).
        self._on_tick = on_tick
        self._cond = threading.Condition()
        self._held: Held | None = None
        #: The thread waits a tick (a task is held), not until the next heartbeat.
        self._ticking = False
        #: A worker id whose drop the supervisor has not been told of yet.
        self._untold: str | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._closed = False
            self._thread = helper_thread(self._main, "alchq-monitor")

    def close(self) -> None:
        self.tell()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None

    def hold(self, held: Held) -> None:
        """Watch ``held`` (the task now in hand) until :meth:`drop`; tell the supervisor."""
        with self._cond:
            self._held = held
            if not self._ticking:  # ticking, it sees the new task within a tick
                self._cond.notify_all()
        self._untold = None  # the supervisor's held task is replaced by this one
        link.send(
            "hold",
            id=held.worker_id,
            model=f"{held.model.__module__}:{held.model.__qualname__}",
            pk=[str(v) for v in held.claim.pk],
            token=held.claim.token,
            phase=held.phase,
            limit=held.time_limit,
            # SIGALRM interrupts the task only where its handler runs: the main thread.
            alarm=held.thread_id == threading.main_thread().ident,
        )

    def drop(self, held: Held, *, tell_later: bool = False) -> None:
        """Stop watching ``held``. ``tell_later``: another task of the batch follows at
        once, so the supervisor is told only if none does (:meth:`tell`): a pipe
        message per task less."""
        with self._cond:
            dropped = self._held is held
            if dropped:
                self._held = None
            # No wake-up: a ticking thread finds nothing held at its next tick.
        if dropped and tell_later:
            self._untold = held.worker_id
        elif dropped:
            link.send("drop", id=held.worker_id)

    def tell(self) -> None:
        """Tell the supervisor of a drop :meth:`drop` kept back."""
        untold, self._untold = self._untold, None
        if untold is not None:
            link.send("drop", id=untold)

    @property
    def held(self) -> Held | None:
        """The task in hand, if any."""
        return self._held

    def _main(self) -> None:
        next_beat = time.monotonic() + self._interval
        failing = False
        while True:
            with self._cond:
                if self._closed:
                    return
                idle = max(0.0, next_beat - time.monotonic())
                self._ticking = self._held is not None
                self._cond.wait(_TICK if self._ticking else idle)
                if self._closed:
                    return
                held = self._held
            now = time.monotonic()
            try:
                if held is not None:
                    selfwait.check(held)
                    if held.hard_deadline is not None and now >= held.hard_deadline:
                        self._on_hard_deadline(held)
                    elif held.interrupt is None and now - held.started >= held.time_limit:
                        self._on_time_limit(held)
                    elif self._on_tick is not None:
                        self._on_tick(held)
                if now >= next_beat:
                    next_beat = now + self._interval
                    self._heartbeat()
                    failing = False
            except Exception as exc:  # the monitor must outlive any one failure
                # The task's own thread reports a database outage; say it once here.
                log = logger.debug if failing else logger.warning
                log("heartbeat failed: %s", first_line(exc))
                failing = True
