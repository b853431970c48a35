"""The package's shape: imports only go down (no cycles), no private names cross modules."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "alchq"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """alchq module -> the alchq modules it imports (at any depth of the file)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                base = node.module
                if base.startswith("alchq"):
                    for alias in node.names:
                        sub = f"{base}.{alias.name}"
                        targets.add(sub if sub in modules else base)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("alchq"))
        # A package importing its own submodules, or alchq importing itself, is not a cycle.
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles() -> None:
    graph = _imports()
    # ``alchq/__init__`` re-exports its submodules: every module may import the
    # package's public names through their own modules, never through ``alchq``.
    graph = {k: {t for t in v if t != "alchq"} for k, v in graph.items()}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"


def test_the_dialect_base_is_a_leaf() -> None:
    graph = _imports()
    assert not {t for t in graph["alchq._dialects.base"] if t.startswith("alchq._dialects")}
