"""PostgreSQL: one ``UPDATE ... WHERE pk IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING``."""

from __future__ import annotations

from alchq._dialects.base import Dialect, register


@register
class PostgreSQLDialect(Dialect):
    name = "postgresql"
    # SKIP LOCKED lets any number of workers pick different rows without
    # waiting on each other; RETURNING makes the claim one round trip.
    skip_locked = True
    returning = True
    partial_index = True
