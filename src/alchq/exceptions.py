"""Errors raised by alchq, grouped by who has to act on them.

::

    AlchqError                     base of everything alchq raises itself
    ├── ConfigurationError         the app must change code or settings
    │   ├── TaskDefinitionError    a model class is not a usable task
    │   ├── ImportTargetError      "module:Class" could not be imported
    │   └── NoDatabaseError        the worker was given no way to reach a database
    └── DatabaseError              the database must be fixed (operator acts)
        ├── DatabaseUnreachableError
        └── TableMissingError

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


class DatabaseError(AlchqError):
    """The database is not in a state the worker can use."""


class DatabaseUnreachableError(DatabaseError):
    """The database server could not be reached (URL shown without password)."""


class TableMissingError(DatabaseError):
    """A task model's table does not exist in the database."""
