"""The rules the package's layout keeps (docs/architecture.md), checked on the source so they cannot rot:
no import circle but the registry's with the blocks it loads, no module over 500 lines, no function over 80,
and no issue numbers in code or comments (history belongs in git)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
ALLOWED_CIRCLE = "perfkit.registry"
"""The registry imports the built-in blocks on first use, and each block module registers itself with it."""


def _modules() -> dict[str, Path]:
    """``{dotted name: path}`` of perfkit's modules, the top-level kernels/ folder as ``perfkit.kernels``."""
    found = {}
    for path in [*ROOT.glob("perfkit/**/*.py"), *ROOT.glob("kernels/*.py")]:
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(("perfkit", *parts) if parts[0] == "kernels" else parts).removesuffix(".__init__")
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The perfkit modules ``name`` imports, at module level or inside functions alike."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            # ``from perfkit.x import y`` names module perfkit.x.y when y is a module, else an attribute of x.
            targets.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names)
    return {t for t in targets if t in modules and t != name}


def _circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        circles.append(component)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return circles


def test_no_import_circle_but_the_registrys_with_its_blocks():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    for circle in _circles(graph):
        assert ALLOWED_CIRCLE in circle and all(
            m == ALLOWED_CIRCLE or m == "perfkit.blocks" or m.startswith("perfkit.blocks.") for m in circle), \
            f"import circle: {' <-> '.join(sorted(circle))}"


def test_the_circle_check_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(graph) == [{"a", "b", "c"}]


def test_no_module_over_500_lines_and_no_function_over_80():
    too_long = []
    for path in _modules().values():
        source = path.read_text()
        if (lines := len(source.splitlines())) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, "\n".join(too_long)


ISSUE_NUMBER = re.compile(r"\bissues? #?\d+\b", re.IGNORECASE)


def test_no_issue_numbers_in_code_or_comments():
    sources = [*ROOT.glob("perfkit/**/*.py"), *ROOT.glob("kernels/*.py"), *ROOT.glob("benchmarks/*.py"),
               *ROOT.glob("tests/*.py"), ROOT / "Makefile", *ROOT.glob(".github/workflows/*.yml")]
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in sources if path != Path(__file__).resolve()
             for number, line in enumerate(path.read_text().splitlines(), 1) if ISSUE_NUMBER.search(line)]
    assert not found, "\n".join(found)
