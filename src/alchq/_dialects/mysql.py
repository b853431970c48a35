"""MySQL 8 / MariaDB 10.6: SKIP LOCKED exists, ``UPDATE ... RETURNING`` does not."""

from __future__ import annotations

from alchq._dialects.base import Dialect


class MySQLDialect(Dialect):
    name = "mysql"
    skip_locked = True
    returning = False
    partial_index = False


class MariaDBDialect(MySQLDialect):
    name = "mariadb"
