"""Errors raised by alchq, grouped by who has to act on them.

::

    AlchqError                     base of everything alchq raises itself
    ├── ConfigurationError         the app must change code or settings
    │   ├── TaskDefinitionError    a model class is not a usable task
    │   ├── ImportTargetError      "module:Class" could not be imported
    │   └── NoDatabaseError        the worker was given no way to reach a database
    ├── TaskStateError             an action the task's status does not allow
    │   └── CancelError            cancel() of a task that is not PENDING
    ├── TaskNotFoundError          no task has the key given
    ├── DatabaseError              the database must be fixed (operator acts)
    │   ├── DatabaseUnreachableError
    │   └── TableMissingError
    └── TaskFailure                given to error(): the task ended without run() raising
        ├── WorkerLostError        its worker was lost too often (max_lost_claims)
        └── TaskTimeoutError       run() overran the model's alchq_time_limit

``TaskCancelled`` (a BaseException) is raised into a run() whose task is
cancelled while it runs.

Exceptions raised by a task's ``run()`` are never wrapped: ``error()`` receives
them exactly as raised.
"""

from __future__ import annotations


class AlchqError(Exception):
    """Base class of every error alchq raises itself."""


class ConfigurationError(AlchqError):
    """The application is misconfigured: code or settings must change."""


class TaskDefinitionError(ConfigurationError):
    """A class given to the worker is not a usable task model."""


class ImportTargetError(ConfigurationError):
    """A ``module:Class`` reference could not be imported."""


class NoDatabaseError(ConfigurationError):
    """The worker has no session factory, engine or Flask-SQLAlchemy app."""


class TaskStateError(AlchqError):
    """The task's status does not allow the action (retry a running task, delete one...)."""


class TaskNotFoundError(AlchqError, LookupError):
    """No task of the model has the key given (or the key is not one of its keys)."""


class CancelError(TaskStateError):
    """Only a PENDING task can be cancelled; this one is running or finished."""


class DatabaseError(AlchqError):
    """The database is not in a state the worker can use."""


class DatabaseUnreachableError(DatabaseError):
    """The database server could not be reached (URL shown without password)."""


class TableMissingError(DatabaseError):
    """A task model's table does not exist in the database."""


class TaskFailure(AlchqError):
    """Why a task ended in ERROR when it was not run() that raised."""


class WorkerLostError(TaskFailure):
    """The task's claims were lost with their workers too many times.

    Each time a worker dies, freezes or is cut off mid-run, its lease expires
    and the task goes back to PENDING; after ``max_lost_claims`` such losses
    it ends in ERROR with this exception instead.
    """


class TaskCancelled(BaseException):  # noqa: N818 - a control-flow signal, like KeyboardInterrupt
    """Raised into ``run()`` when its task was cancelled while running.

    A BaseException, so that a task's ``except Exception`` does not swallow it:
    clean up in ``finally`` and let it pass. The worker rolls back run()'s
    writes and ends the task CANCELLED (``error()`` is not called).
    """


class TaskTimeoutError(TaskFailure):
    """``run()`` took longer than the model's ``alchq_time_limit`` and was stopped."""
