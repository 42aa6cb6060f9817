"""The repository's own import graph, read from the source (nothing is imported).

Used by the comparison's run key (a run is reused only while every module its training
imports is unchanged) and by the layout tests (no cycles, adapters kept apart).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline_lib", "tasks", "flows", "ops", "bench")


def python_files(package: str, root: Path = ROOT) -> list[Path]:
    return sorted((root / package).rglob("*.py"))


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_files(packages: tuple[str, ...] = PACKAGES, root: Path = ROOT) -> dict[str, Path]:
    return {
        module_name(path, root): path
        for package in packages
        for path in python_files(package, root)
    }


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Repository modules `path` imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def import_graph(packages: tuple[str, ...] = PACKAGES, root: Path = ROOT) -> dict[str, set[str]]:
    """module -> repository modules it imports (a package's __init__ counts as the package)."""
    files = module_files(packages, root)
    return {name: imports_of(path, set(files)) - {name} for name, path in files.items()}


def closure(graph: dict[str, set[str]], start: str) -> set[str]:
    """`start` and every module it imports, directly or not. Importing a.b.c also runs
    the packages a and a.b (their __init__ files)."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        parents = {".".join(parts[:i]) for i in range(1, len(parts))} & set(graph)
        todo += sorted((graph.get(name, set()) | parents) - seen)
    return seen


def module_closure_files(starts: tuple[str, ...], root: Path = ROOT) -> list[Path]:
    """The source files of the `starts` modules and of every repository module they
    import, directly or not, sorted."""
    files = module_files(("pipeline_lib", "tasks", "flows"), root)
    graph = {name: imports_of(path, set(files)) - {name} for name, path in files.items()}
    unknown = [start for start in starts if start not in graph]
    if unknown:
        raise KeyError(f"not modules under {root}: {unknown}")
    return sorted({files[name] for start in starts for name in closure(graph, start)})
