"""The modules of sslab and benchmarks import one another in one direction only (no circles,
function-level imports included), and each of them imports on its own, first in a fresh
interpreter, so none works only when another module happened to be imported before it."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sslab", "benchmarks")


def module_files() -> dict:
    """Dotted module name → file, for every module of the packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


class _Imports(ast.NodeVisitor):
    """Every import statement of a module, at any depth (a function-level import is still a
    dependency), except those under ``if TYPE_CHECKING:`` (never executed)."""

    def __init__(self):
        self.found = []

    def visit_If(self, node):
        test = node.test
        if getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING":
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node):
        self.found.append(node)

    def visit_ImportFrom(self, node):
        self.found.append(node)


def _targets(module: str, is_package: bool, node, modules: dict) -> list:
    """The modules of the packages that one import statement of ``module`` loads."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        names = [target] + [f"{target}.{alias.name}" for alias in node.names]  # `from pkg import module`
    return [name for name in names if name in modules]


def import_graph() -> dict:
    """Module → the modules it imports (a package and its own modules left out: importing
    ``sslab.lab.params`` runs ``sslab/lab/__init__.py`` by definition)."""
    modules = module_files()
    edges = {name: set() for name in modules}
    for name, path in modules.items():
        visitor = _Imports()
        visitor.visit(ast.parse(path.read_text(), str(path)))
        for node in visitor.found:
            for target in _targets(name, path.name == "__init__.py", node, modules):
                if target != name and not target.startswith(name + ".") and not name.startswith(target + "."):
                    edges[name].add(target)
    return edges


def cycles(edges: dict) -> list:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(edges[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(found)


def test_the_cycle_finder_finds_a_circle_through_a_function_level_import_and_ignores_type_checking():
    # The finder itself, on a made-up graph: a→b→c→a is one circle, d→a is not part of it.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    visitor = _Imports()
    visitor.visit(ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .x import A\n"
                            "def f():\n    from .y import B\n"))
    assert [node.module for node in visitor.found] == ["typing", "y"]


def test_the_graph_sees_the_imports_of_a_known_module():
    edges = import_graph()
    assert {"sslab.checks", "sslab.data"} <= edges["sslab.cli"]  # top-level imports
    assert "sslab.pretrain" in edges["sslab.cli"]  # a function-level one
    assert "benchmarks.step" in edges["benchmarks.bench"]  # relative, inside benchmarks


def test_no_import_circles():
    circles = cycles(import_graph())
    assert not circles, "import circles (function-level imports count): " + "; ".join(
        " <-> ".join(circle) for circle in circles)


# Runs in a fresh interpreter: before each module, every module of the packages is forgotten, so
# each is imported first, on its own (third-party packages such as torch stay loaded: importing
# them again would only cost time).
IMPORT_EACH = """
import importlib, json, sys, traceback
failures = []
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m.split(".")[0] in ("sslab", "benchmarks")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException as exc:
        failures.append(f"{name}: {traceback.format_exception_only(type(exc), exc)[-1].strip()}")
print(json.dumps(failures))
"""


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    names = sorted(module_files())
    assert "sslab.cli" in names and "benchmarks.bench" in names and len(names) > 40
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", IMPORT_EACH, json.dumps(names)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failures, "modules that fail to import on their own:\n" + "\n".join(failures)
