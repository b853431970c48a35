"""Alembic support: portable migrations, and adopting a table that already holds rows.

Installed with alchq, an Alembic plugin (``alchq._alembic_plugin``) makes
``alembic revision --autogenerate`` and ``flask db migrate`` write migrations
that run on every database, with no edit to ``env.py`` or the migration:

- alchq's time columns are written as ``alchq.UTCDateTime()`` with the server
  default ``alchq.utc_now()``, and the file gets ``import alchq``: the SQL is
  chosen by the database the migration runs on, not the one it was made on;
- an existing table that becomes a task model is *adopted*: the migration
  calls :func:`adopt_table` instead of adding alchq's columns one by one, so it
  also gets alchq's indexes and CHECK constraints, and its old rows are
  marked finished instead of becoming PENDING (and running again).

Leave the plugin out with ``autogenerate_plugins=["alembic.autogenerate.*",
"~alchq"]`` in ``context.configure()`` (with Flask-Migrate:
``Migrate(app, db, autogenerate_plugins=[...])``); :func:`render_item` can then
be passed as ``render_item=`` by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from alembic import op
from alembic.autogenerate import renderers
from alembic.autogenerate.api import AutogenContext
from alembic.operations import MigrateOperation, ops
from sqlalchemy import (
    CheckConstraint,
    Column,
    DefaultClause,
    Index,
    Integer,
    MetaData,
    Table,
    inspect,
    update,
)

from alchq._dialects import utc_now
from alchq._dialects.types import UTCDateTime
from alchq.model import Status, add_queue_schema, queue_columns

__all__ = ["adopt_table", "autogenerate", "drop_queue_schema", "render_item"]

#: What the ``existing`` rows of an adopted table may become.
_ADOPTABLE = (Status.PROCESSED, Status.PENDING, Status.ERROR, Status.CANCELLED)
#: The plugin's name, as in ``autogenerate_plugins``.
PLUGIN = "alchq"


# -- rendering ---------------------------------------------------------------------


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | bool:
    """Alembic ``render_item`` hook: alchq's type and default as portable Python.

    Returns False for anything else (Alembic then renders it as usual).
    """
    if type_ == "type" and isinstance(obj, UTCDateTime):
        autogen_context.imports.add("import alchq")
        return "alchq.UTCDateTime()"
    if type_ == "server_default" and isinstance(obj, DefaultClause):
        if isinstance(obj.arg, utc_now) and not list(obj.arg.clauses):
            autogen_context.imports.add("import alchq")
            return "alchq.utc_now()"
    return False


def _chain(user_hook: Any) -> Any:
    """A render_item hook asking the app's own hook first, then alchq's."""

    def hook(type_: str, obj: Any, autogen_context: AutogenContext) -> str | bool:
        if user_hook is not None:
            rendered = user_hook(type_, obj, autogen_context)
            if rendered is not False:
                return rendered  # type: ignore[no-any-return]
        return render_item(type_, obj, autogen_context)

    hook.alchq = True  # type: ignore[attr-defined]
    return hook


# -- adopting a table: the operations autogenerate writes ------------------------------


class _QueueSchemaOp(MigrateOperation):
    """A table, its schema and the naming convention of its CHECK constraints."""

    def __init__(
        self, table_name: str, schema: str | None, naming_convention: Mapping[str, str] | None
    ) -> None:
        self.table_name = table_name
        self.schema = schema
        self.naming_convention = naming_convention


class AdoptTableOp(_QueueSchemaOp):
    """Autogenerate's directive: make an existing table a task table."""

    def reverse(self) -> DropQueueSchemaOp:
        return DropQueueSchemaOp(self.table_name, self.schema, self.naming_convention)


class DropQueueSchemaOp(_QueueSchemaOp):
    """Its reverse: take alchq's columns, indexes and constraints off the table."""

    def reverse(self) -> AdoptTableOp:
        return AdoptTableOp(self.table_name, self.schema, self.naming_convention)


def _call(name: str, operation: _QueueSchemaOp) -> str:
    args = [repr(operation.table_name)]
    if operation.schema is not None:
        args.append(f"schema={operation.schema!r}")
    if operation.naming_convention is not None:
        args.append(f"naming_convention={dict(operation.naming_convention)!r}")
    return f"alchq.alembic.{name}({', '.join(args)})"


@renderers.dispatch_for(AdoptTableOp)
def _render_adopt(autogen_context: AutogenContext, operation: AdoptTableOp) -> str:
    autogen_context.imports.add("import alchq.alembic")
    return (
        "# The table's existing rows are marked PROCESSED (pass existing='PENDING'\n"
        "# to have them run); see alchq.alembic.adopt_table.\n" + _call("adopt_table", operation)
    )


@renderers.dispatch_for(DropQueueSchemaOp)
def _render_drop(autogen_context: AutogenContext, operation: DropQueueSchemaOp) -> str:
    autogen_context.imports.add("import alchq.alembic")
    return _call("drop_queue_schema", operation)


# -- adopting a table: what the migration does ---------------------------------------


def _queue_table(
    table_name: str,
    schema: str | None,
    pk: list[str],
    naming_convention: Mapping[str, str] | None,
) -> Table:
    """A throwaway Table with alchq's columns, the table's primary key, and
    alchq's indexes and constraints (named as the model's would be)."""
    convention = dict(naming_convention) if naming_convention is not None else {}
    metadata = MetaData(naming_convention=convention)
    # The primary key's type does not matter here: only its columns' names are used.
    table = Table(
        table_name,
        metadata,
        *[Column(name, Integer, primary_key=True) for name in pk],
        *queue_columns(),
        schema=schema,
    )
    add_queue_schema(table)
    return table


def _alchq_indexes(table: Table) -> list[Index]:
    return sorted(
        (ix for ix in table.indexes if str(ix.name).startswith(f"ix_{table.name}_alchq_")),
        key=lambda ix: str(ix.name),
    )


def _alchq_checks(table: Table) -> list[CheckConstraint]:
    return [c for c in table.constraints if isinstance(c, CheckConstraint)]


def adopt_table(
    table_name: str,
    *,
    existing: str = "PROCESSED",
    schema: str | None = None,
    naming_convention: Mapping[str, str] | None = None,
) -> None:
    """In a migration: add alchq's columns, indexes and constraints to ``table_name``.

    The table's rows already there become ``existing`` (default PROCESSED,
    so old work does not run again; ``"PENDING"`` makes them tasks to run),
    with ``time_created``, ``time_updated`` and ``run_at`` set to now: for
    ``alchq prune`` an adopted row is as old as its adoption. A table that
    already has a column of alchq's name is refused: rename that column first.

    Pass ``naming_convention`` when your metadata's ``"ck"`` convention is not
    ``ck_%(table_name)s_%(constraint_name)s`` (autogenerate passes it for you).
    """
    try:
        status = Status(existing)
    except ValueError:
        status = None
    if status not in _ADOPTABLE:
        raise ValueError(
            f"adopt_table({table_name!r}): existing must be one of "
            f"{', '.join(s.value for s in _ADOPTABLE)}, got {existing!r}"
        )
    bind = op.get_bind()
    found = inspect(bind)
    if not found.has_table(table_name, schema=schema):
        raise ValueError(f"adopt_table: there is no table {table_name!r} to adopt")
    have = {c["name"] for c in found.get_columns(table_name, schema=schema)}
    pk = list(found.get_pk_constraint(table_name, schema=schema)["constrained_columns"])
    if not pk:
        raise ValueError(f"adopt_table({table_name!r}): the table has no primary key")
    target = _queue_table(table_name, schema, pk, naming_convention)
    clash = [c.name for c in queue_columns() if c.name in have]
    if clash:
        raise ValueError(
            f"adopt_table({table_name!r}): the table already has column(s) "
            f"{', '.join(map(repr, clash))}, which alchq adds: rename them first "
            "(op.alter_column(..., new_column_name=...)) and in your model"
        )
    # SQLite cannot ADD COLUMN with a non-constant default (the time columns'):
    # there the table is rebuilt with its new columns, which fills them in.
    recreate: Literal["always", "auto"] = "always" if bind.dialect.name == "sqlite" else "auto"
    with op.batch_alter_table(table_name, schema=schema, recreate=recreate) as batch:
        for column in queue_columns():
            batch.add_column(column)
        for check in _alchq_checks(target):
            batch.create_check_constraint(str(check.name), check.sqltext)
    rows = Table(table_name, MetaData(), *queue_columns(), schema=schema)
    op.execute(update(rows).values(status=status.value))
    for index in _alchq_indexes(target):
        op.create_index(
            str(index.name),
            table_name,
            [c.name for c in index.columns],
            unique=bool(index.unique),
            schema=schema,
            **index.dialect_kwargs,
        )


def drop_queue_schema(
    table_name: str,
    *,
    schema: str | None = None,
    naming_convention: Mapping[str, str] | None = None,
) -> None:
    """In a migration: undo :func:`adopt_table` (drops alchq's columns and their data)."""
    found = inspect(op.get_bind())
    pk = list(found.get_pk_constraint(table_name, schema=schema)["constrained_columns"])
    target = _queue_table(table_name, schema, pk, naming_convention)
    for index in _alchq_indexes(target):
        # As created: MySQL's form of a partial unique index has a column to drop too.
        op.drop_index(
            str(index.name),
            table_name=table_name,
            schema=schema,
            unique=bool(index.unique),
            **index.dialect_kwargs,
        )
    with op.batch_alter_table(table_name, schema=schema) as batch:
        for check in _alchq_checks(target):
            batch.drop_constraint(str(check.name), type_="check")
        for column in reversed(queue_columns()):
            batch.drop_column(str(column.name))


# -- the autogenerate comparator ---------------------------------------------------


def _excluded(autogen_context: AutogenContext) -> bool:
    wanted = autogen_context.migration_context.opts.get("autogenerate_plugins") or ()
    return f"~{PLUGIN}" in wanted


def _table_of(autogen_context: AutogenContext, name: str, schema: str | None) -> Table | None:
    key = f"{schema}.{name}" if schema else name
    return autogen_context.table_key_to_table.get(key)


def autogenerate(autogen_context: AutogenContext, upgrade_ops: ops.UpgradeOps) -> None:
    """Alembic comparator (run last): portable rendering, and adoption of tables.

    A table that exists in the database and gains BaseQueue's columns in the
    model gets one :class:`AdoptTableOp` (before the table's other changes)
    instead of alchq's ``add_column`` and ``create_index`` operations.
    """
    if _excluded(autogen_context):
        return
    hook = autogen_context.opts.get("render_item")
    if not getattr(hook, "alchq", False):
        autogen_context.opts["render_item"] = _chain(hook)
    names = {c.name for c in queue_columns()}
    dialect = autogen_context.dialect.name if autogen_context.dialect is not None else ""
    result: list[ops.MigrateOperation] = []
    for operation in upgrade_ops.ops:
        if isinstance(operation, ops.ModifyTableOps) and dialect in ("mysql", "mariadb"):
            _forget_generated_unique_column(operation)
            if not operation.ops:
                continue
        if isinstance(operation, ops.ModifyTableOps):
            adopted = _adoption(autogen_context, operation, names)
            if adopted is not None:
                result.append(adopted)
                if not operation.ops:
                    continue
        result.append(operation)
    upgrade_ops.ops = result


def _forget_generated_unique_column(operation: ops.ModifyTableOps) -> None:
    """MySQL/MariaDB: the unique index of active keys is on a generated column of
    its own name (see alchq._dialects.mysql), which the model does not declare:
    not a difference to undo."""
    name = f"ix_{operation.table_name}_alchq_unique"
    dropped = {
        str(o.index_name)
        for o in operation.ops
        if isinstance(o, ops.DropIndexOp) and o.index_name == name
    }
    operation.ops = [
        o
        for o in operation.ops
        if not (isinstance(o, ops.DropColumnOp) and o.column_name == name)
        and not (isinstance(o, (ops.DropIndexOp, ops.CreateIndexOp)) and o.index_name in dropped)
    ]


def _adoption(
    autogen_context: AutogenContext, operation: ops.ModifyTableOps, names: set[str]
) -> AdoptTableOp | None:
    added = {
        o.column.name
        for o in operation.ops
        if isinstance(o, ops.AddColumnOp) and o.column.name in names
    }
    # alchq_attempts is alchq's alone: a table that gains it is being adopted,
    # even when it has a column of another of alchq's names (adopt_table then
    # says to rename it, instead of a migration that adds half the schema).
    if "alchq_attempts" not in added:
        return None
    table = _table_of(autogen_context, operation.table_name, operation.schema)
    if table is None or f"ix_{table.name}_alchq_ready" not in {ix.name for ix in table.indexes}:
        return None
    prefix = f"ix_{table.name}_alchq_"
    operation.ops = [
        o
        for o in operation.ops
        if not (isinstance(o, ops.AddColumnOp) and o.column.name in names)
        and not (isinstance(o, ops.CreateIndexOp) and str(o.index_name).startswith(prefix))
    ]
    convention = table.metadata.naming_convention.get("ck")
    default = "ck_%(table_name)s_%(constraint_name)s"
    naming = None if convention in (None, default) else {"ck": str(convention)}
    return AdoptTableOp(operation.table_name, operation.schema, naming)
