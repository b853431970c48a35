"""alchq's Alembic plugin, loaded by Alembic through the ``alembic.plugins`` entry point.

It is registered as ``alembic.autogenerate.alchq`` so that Alembic's default
``autogenerate_plugins`` list (``["alembic.autogenerate.*"]``) includes it: the
stock ``env.py`` of Alembic and Flask-Migrate then writes portable migrations
with no edit. It is also registered as ``alchq``, for an env.py that lists its
plugins by name. ``"~alchq"`` in that list leaves it out (see alchq.alembic).
"""

from __future__ import annotations

from typing import Any

from alembic.runtime.plugins import Plugin
from alembic.util import DispatchPriority, PriorityDispatchResult

#: The second name the plugin answers to (the entry point's name is the first).
SHORT_NAME = "alchq"


def _compare(autogen_context: Any, upgrade_ops: Any) -> PriorityDispatchResult:
    # Imported here, not at the top: Alembic loads this module while its own
    # autogenerate package is still being imported.
    from alchq.alembic import autogenerate

    autogenerate(autogen_context, upgrade_ops)
    return PriorityDispatchResult.CONTINUE


def setup(plugin: Plugin) -> None:
    """Called by Alembic with the plugin it made for the entry point."""
    plugins = [plugin]
    if plugin.name != SHORT_NAME:
        plugins.append(Plugin(SHORT_NAME))
    for each in plugins:
        # LAST: after Alembic's own comparators have produced the operations
        # that alchq rewrites. Running twice (both names listed) is harmless.
        each.add_autogenerate_comparator(_compare, "autogenerate", priority=DispatchPriority.LAST)
