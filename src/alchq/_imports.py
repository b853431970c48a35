"""Resolve ``module:Class`` references given on the command line."""

from __future__ import annotations

import importlib
import os
import sys

from alchq.exceptions import ImportTargetError, TaskDefinitionError
from alchq.model import BaseQueue, check_task_model


def import_model(ref: str) -> type[BaseQueue]:
    """Import ``package.module:ClassName`` and check that it is a task model."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ImportTargetError(f"{ref!r} is not of the form 'package.module:ClassName'")
    # Like `python -m` and `flask`, find modules of the current directory.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (
            module_name == exc.name or module_name.startswith(exc.name + ".")
        ):
            raise ImportTargetError(f"module {module_name!r} not found (from {ref!r})") from exc
        raise ImportTargetError(
            f"importing {module_name!r} failed: module {exc.name!r} not found"
        ) from exc
    except Exception as exc:
        raise ImportTargetError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    obj: object = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportTargetError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not (isinstance(obj, type) and issubclass(obj, BaseQueue)):
        raise TaskDefinitionError(f"{ref} is not a BaseQueue model (it is {obj!r})")
    return check_task_model(obj)
