"""The shape of the package (issue 12): which layer may import which, no import circles, and no
source file too long to read in one sitting.

The house, bottom to top::

    binaryduo.models     binaryduo.data                (libraries: know nothing of each other)
    binaryduo.slurm                                    (job files; knows nothing of the trainer)
    binaryduo.trainer.{recipe, runtime, tracking}      (what a run is made of)
    binaryduo.trainer.analysis                         (reads models; never runs training)
    binaryduo.trainer.run                              (a training run: stages, loop, checkpoints)
    binaryduo.trainer.cli                              (the ``binaryduo`` command)

Arrows point down only: cli -> run -> {recipe, runtime, tracking}; cli -> analysis; cli -> slurm.

Imports are read with ``ast`` from the source files (never executed): absolute and relative,
at module level and inside functions (a lazy import is still a dependency).
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CODE_FOLDERS = ("models", "data", "trainer", "slurm")
MAX_LINES = 450

#: layer -> the packages it must never import (a module belongs to the longest matching layer).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "binaryduo.models": ("binaryduo.data", "binaryduo.trainer", "binaryduo.slurm"),
    "binaryduo.data": ("binaryduo.models", "binaryduo.trainer", "binaryduo.slurm"),
    "binaryduo.slurm": ("binaryduo.trainer",),
    "binaryduo.trainer.recipe": ("binaryduo.trainer.run", "binaryduo.trainer.cli"),
    "binaryduo.trainer.runtime": ("binaryduo.trainer.run", "binaryduo.trainer.cli"),
    "binaryduo.trainer.tracking": ("binaryduo.trainer.run", "binaryduo.trainer.cli"),
    "binaryduo.trainer.analysis": ("binaryduo.trainer.run", "binaryduo.trainer.cli"),
    "binaryduo.trainer.export": ("binaryduo.trainer.run", "binaryduo.trainer.cli"),
    "binaryduo.trainer.run": ("binaryduo.trainer.cli",),
}


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def package_dirs() -> dict[str, str]:
    """setup.py's ``PACKAGE_DIRS`` (package -> folder), evaluated without running setup()."""
    tree = ast.parse((REPO / "setup.py").read_text())
    assignment = next((node for node in tree.body if isinstance(node, ast.Assign)
                       and any(getattr(t, "id", None) == "PACKAGE_DIRS" for t in node.targets)),
                      None)
    assert assignment is not None, "setup.py no longer assigns PACKAGE_DIRS at module level"
    namespace: dict = {}
    exec(compile(ast.Module([assignment], type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace["PACKAGE_DIRS"]


def source_files() -> list[Path]:
    return sorted(p for folder in CODE_FOLDERS for p in (REPO / folder).rglob("*.py")
                  if "__pycache__" not in p.parts)


def module_names() -> dict[Path, str]:
    """Every source file -> its installed dotted name (binaryduo.trainer.run.runner, ...)."""
    package_of_folder = {REPO / folder: package for package, folder in package_dirs().items()}
    modules, orphans = {}, []
    for path in source_files():
        package = package_of_folder.get(path.parent)
        if package is None:
            orphans.append(str(path.relative_to(REPO)))
        elif path.name == "__init__.py":
            modules[path] = package
        else:
            modules[path] = f"{package}.{path.stem}"
    assert not orphans, f"not in setup.py's PACKAGE_DIRS, so never installed: {orphans}"
    return modules


def imported_modules(path: Path, module: str, known: set[str]) -> set[str]:
    """The binaryduo modules ``module`` imports anywhere in its source. ``from pkg import name``
    imports ``pkg.name`` when that is a module, else ``pkg``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in known else target)
    return {name for name in found if _within(name, "binaryduo") and name != module}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = module_names()
    known = set(modules.values())
    return {module: imported_modules(path, module, known) for path, module in modules.items()}


def layer_of(module: str) -> str | None:
    layers = [layer for layer in FORBIDDEN if _within(module, layer)]
    return max(layers, key=len) if layers else None


def test_every_binaryduo_import_names_a_real_module(graph):
    known = set(graph)
    unknown = {f"{module} imports {name}" for module, names in graph.items() for name in names
               if name not in known and name != "binaryduo"}
    assert not unknown, sorted(unknown)


def test_layers_import_only_downwards(graph):
    violations = []
    for module, names in sorted(graph.items()):
        layer = layer_of(module)
        for name in sorted(names):
            for forbidden in FORBIDDEN.get(layer, ()):
                if _within(name, forbidden):
                    violations.append(f"{module} imports {name} ({layer} must not import "
                                      f"{forbidden})")
    assert not violations, "\n".join(violations)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) per strongly connected component with more than one
    module, or a module importing itself (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
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
                    components.append(component)
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    cycles = []
    for component in components:
        start = min(component)
        if len(component) == 1 and start not in graph.get(start, ()):
            continue
        cycles.append(_path_back(graph, start, component))
    return cycles


def _path_back(graph, start: str, component: set[str]) -> list[str]:
    """The shortest path start -> ... -> start inside ``component`` (breadth first)."""
    previous, frontier = {}, [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child in component and child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def test_find_cycles_reports_a_path():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"a"}}) == [["a", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_rules_see_relative_lazy_and_from_imports(tmp_path):
    """The reader itself: relative imports resolve, imports inside functions count, and
    ``from pkg import name`` means the module pkg.name when there is one."""
    source = tmp_path / "runner.py"
    source.write_text("from .loop import x\nfrom binaryduo.trainer import cli\n"
                      "def f():\n    from ..recipe.schema import Recipe\n"
                      "    import binaryduo.slurm.jobs\n")
    known = {"binaryduo.trainer.run.loop", "binaryduo.trainer.cli",
             "binaryduo.trainer.recipe.schema", "binaryduo.slurm.jobs"}
    assert imported_modules(source, "binaryduo.trainer.run.runner", known) == known
    graph = {"binaryduo.slurm.jobs": {"binaryduo.trainer.run.checkpoint"},
             "binaryduo.trainer.run.checkpoint": set()}
    with pytest.raises(AssertionError, match="binaryduo.slurm must not import binaryduo.trainer"):
        test_layers_import_only_downwards(graph)


def test_no_source_file_is_too_long():
    long_files = {str(p.relative_to(REPO)): n for p in source_files()
                  if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long_files, (f"over {MAX_LINES} lines (split by concern): "
                            f"{dict(sorted(long_files.items(), key=lambda kv: -kv[1]))}")
