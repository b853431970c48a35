"""Noticing a run() that waits for a lock its own task holds.

The natural way to report progress by hand is to write the task's row through
a second connection while the task's session has written to it too: the
second connection then waits for the session's transaction, which waits for
run(), which waits for the second connection. PostgreSQL waits until the time
limit; SQLite until its busy timeout. Nothing fails meanwhile, so the monitor
asks, for a statement of run()'s that has been in flight for
:data:`THRESHOLD` seconds on another connection to the task's database,
whether the task's own connections block it, and says so once.
"""

from __future__ import annotations

import logging
import time

from alchq._held import Held
from alchq._util import first_line

logger = logging.getLogger("alchq.worker")

#: Seconds a statement on a second connection waits before it is looked at.
THRESHOLD = 2.0


def check(held: Held) -> None:
    """Called by the monitor every tick while ``held`` runs: warn once per run."""
    watch = held.watch
    if watch is None or watch.reported or not watch.waiting or not held.in_run:
        return
    now = time.monotonic()
    for waiting in list(watch.waiting.values()):
        if waiting.checked or now - waiting.since < THRESHOLD:
            continue
        waiting.checked = True
        try:
            blocked = held.dialect.waits_for(
                waiting.engine,
                waiting.backend,
                list(watch.backends),
                writing=waiting.writing,
                wrote=watch.writes > 0,
            )
        except Exception as exc:  # a question, not a duty: never the worker's failure
            logger.debug("%s: could not ask who blocks run(): %s", held.label, first_line(exc))
            continue
        if blocked:
            watch.reported = True
            logger.warning(
                "%s: run() is waiting for a lock its own session holds: a statement on a "
                "second connection has waited %.0fs for the task's uncommitted writes, and "
                "will wait until the time limit (%gs). Commit the session before writing "
                "through another connection, or write through the session itself",
                held.label,
                now - waiting.since,
                held.time_limit,
            )
            return
