"""alchq: a task queue for SQLAlchemy apps in which the database is the queue.

Public API::

    from alchq import BaseQueue, Status, worker, metadata
    from alchq import Retry, Snooze, Periodic     # scheduling
"""

from __future__ import annotations

from alchq import worker
from alchq._dialects import utc_now
from alchq._dialects.types import UTCDateTime
from alchq._prune import prune
from alchq._version import __version__  # noqa: E402
from alchq.exceptions import (
    AlchqError,
    CancelError,
    ConfigurationError,
    DatabaseError,
    DatabaseUnreachableError,
    ImportTargetError,
    NoDatabaseError,
    TableMissingError,
    TaskCancelled,
    TaskDefinitionError,
    TaskFailure,
    TaskNotFoundError,
    TaskStateError,
    TaskTimeoutError,
    WorkerLostError,
)
from alchq.model import BaseQueue, Enqueued, Status, metadata
from alchq.scheduling import Periodic, Retry, Snooze

__all__ = [
    "AlchqError",
    "BaseQueue",
    "CancelError",
    "ConfigurationError",
    "DatabaseError",
    "DatabaseUnreachableError",
    "Enqueued",
    "ImportTargetError",
    "NoDatabaseError",
    "Periodic",
    "Retry",
    "Snooze",
    "Status",
    "TableMissingError",
    "TaskCancelled",
    "TaskDefinitionError",
    "TaskFailure",
    "TaskNotFoundError",
    "TaskStateError",
    "TaskTimeoutError",
    "WorkerLostError",
    "UTCDateTime",
    "__version__",
    "metadata",
    "prune",
    "utc_now",
    "worker",
]
