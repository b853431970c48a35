"""alchq: a task queue for SQLAlchemy apps in which the database is the queue.

Public API::

    from alchq import BaseQueue, Status, worker, metadata
"""

from __future__ import annotations

from alchq import worker
from alchq._dialects.types import UTCDateTime
from alchq.exceptions import (
    AlchqError,
    ConfigurationError,
    DatabaseError,
    DatabaseUnreachableError,
    ImportTargetError,
    NoDatabaseError,
    TableMissingError,
    TaskDefinitionError,
    TaskFailure,
    TaskTimeoutError,
    WorkerLostError,
)
from alchq.model import BaseQueue, Status, metadata

__version__ = "0.1.0"

__all__ = [
    "AlchqError",
    "BaseQueue",
    "ConfigurationError",
    "DatabaseError",
    "DatabaseUnreachableError",
    "ImportTargetError",
    "NoDatabaseError",
    "Status",
    "TableMissingError",
    "TaskDefinitionError",
    "TaskFailure",
    "TaskTimeoutError",
    "WorkerLostError",
    "UTCDateTime",
    "__version__",
    "metadata",
    "worker",
]
