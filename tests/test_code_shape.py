"""The layout promises of STYLE.md, checked: short functions and modules, no import cycles,
adapters apart from the method, no Prefect in the library, no sys.path edits."""

from __future__ import annotations

import ast
import re
import subprocess

from pipeline_lib.import_graph import PACKAGES, ROOT, closure, import_graph, python_files

MAX_FUNCTION_LINES = 80
MAX_LIBRARY_MODULE_LINES = 600
# The method: pure logic that takes values and returns values (STYLE.md's layering).
METHOD_MODULES = (
    "pipeline_lib.allocation",
    "pipeline_lib.grpo",
    "pipeline_lib.status",
    "pipeline_lib.rewards.answers",
    "pipeline_lib.evaluation.metrics",
    "pipeline_lib.comparison.stats",
)
ADAPTERS = "pipeline_lib.adapters"


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function, its docstring left out."""
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        if isinstance(first.value.value, str):
            lines -= first.end_lineno - first.lineno + 1
    return lines


def test_no_function_is_longer_than_80_lines():
    too_long = []
    for package in PACKAGES:
        for path in python_files(package):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = _body_lines(node)
                    if lines > MAX_FUNCTION_LINES:
                        too_long.append(
                            f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {lines}"
                        )
    assert not too_long, "functions over 80 lines:\n" + "\n".join(too_long)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = "open", stack.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == "open":
                return stack[stack.index(child) :] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        state[node], _ = "done", stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_library_has_no_import_cycle():
    graph = import_graph(("pipeline_lib",))
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_whole_tree_has_no_import_cycle():
    graph = import_graph()
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def _is_method_module(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in METHOD_MODULES)


def test_no_method_module_imports_an_adapter():
    """Directly or through another module: the method never reaches MLflow, DVC, files."""
    graph = import_graph(("pipeline_lib",))
    method = [name for name in graph if _is_method_module(name)]
    assert len(method) >= len(METHOD_MODULES)
    leaks = {
        name: sorted(m for m in closure(graph, name) if m.startswith(ADAPTERS)) for name in method
    }
    assert not {name: found for name, found in leaks.items() if found}


def _imported_top_level_packages(path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_nothing_in_the_library_imports_prefect():
    offenders = [
        str(path.relative_to(ROOT))
        for path in python_files("pipeline_lib")
        if "prefect" in _imported_top_level_packages(path)
    ]
    assert not offenders


def test_no_library_module_is_longer_than_600_lines():
    too_long = {
        str(path.relative_to(ROOT)): n
        for path in python_files("pipeline_lib")
        if (n := len(path.read_text().splitlines())) > MAX_LIBRARY_MODULE_LINES
    }
    assert not too_long


def test_no_code_edits_sys_path():
    """Tooling is importable packages run with `python -m`; only a conftest may edit it."""
    tracked = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    edit = re.compile(r"sys\.path\.(insert|append)|sys\.path\[[^]]*\]\s*=")
    offenders = [
        name
        for name in tracked
        if not name.endswith("conftest.py")
        and name != "tests/test_code_shape.py"
        and (ROOT / name).exists()
        and edit.search((ROOT / name).read_text())
    ]
    assert not offenders
