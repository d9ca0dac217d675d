"""No import cycles between the modules of ``src/instructrl`` (issue 22: type-only imports included).

What counts as an edge ``m → n`` (module ``m`` imports module ``n``): every ``import`` / ``from … import``
statement anywhere in ``m``'s source, found with ``ast.walk``, so including

* imports under ``if TYPE_CHECKING:``: a type-only cycle still means neither module can be read, typed or
  moved without the other;
* function-local imports: they run when the function is called, so they are runtime imports; deferring one
  hides a cycle from the interpreter, not from the design;
* imports in ``try:`` blocks.

Resolution: ``from instructrl.x import y`` is an edge to ``instructrl.x.y`` when that is a module of the
package (a submodule import), else to ``instructrl.x``; relative imports resolve against the importing
module's package. ``import instructrl.x.y`` is an edge to ``instructrl.x.y``. A package's ``__init__`` is
the module named after the package, so an ``__init__`` that imports its submodules has edges to them.
Importing ``instructrl.x.y`` also runs ``instructrl/x/__init__.py``, but that implicit step is *not* an edge:
otherwise every submodule that imports a sibling would form a cycle with an ``__init__`` that re-exports it,
a layout Python handles and nobody would call a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

PACKAGE = "instructrl"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / "src" / PACKAGE

ALLOWED_CYCLES: tuple[frozenset[str], ...] = ()
"""Cycles tolerated for now (none): an entry names every module of one cycle and must be deleted with it."""


def module_names(package_dir: Path, package: str) -> dict[str, Path]:
    """``{dotted module name: source path}`` for every ``.py`` file under ``package_dir``."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = (package, *path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(module: str, is_package: bool, source: str, known: Iterable[str]) -> set[str]:
    """Modules among ``known`` that ``module`` imports anywhere in ``source`` (see the module docstring)."""
    known = set(known)
    root = module.split(".")[0]
    # The package that relative imports start from: the module itself for an __init__, else its parent.
    anchor = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = anchor[: len(anchor) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            # `from pkg import name` imports the submodule pkg.name when there is one, else takes a name of pkg.
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t.split(".")[0] == root and t != module)
    return found


def import_graph(package_dir: Path = PACKAGE_DIR, package: str = PACKAGE) -> dict[str, set[str]]:
    """``{module: modules it imports}`` over the package's own modules."""
    modules = module_names(package_dir, package)
    return {
        name: imported_modules(name, path.name == "__init__.py", path.read_text(encoding="utf-8"), modules)
        for name, path in modules.items()
    }


def strongly_connected_components(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each as a sorted list; singletons included."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph.get(succ, ())))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def cycle_path(graph: Mapping[str, Iterable[str]], component: Iterable[str]) -> list[str]:
    """One closed path ``[a, b, …, a]`` through the component's first node, staying inside the component."""
    members = set(component)
    start = min(members)
    # Breadth-first search from start back to start: the shortest cycle through it, readable in a failure.
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        next_frontier = []
        for node in frontier:
            for succ in sorted(graph.get(node, ())):
                if succ not in members:
                    continue
                if succ == start:
                    back = [node]  # node, its parent, …, start
                    while back[-1] != start:
                        back.append(parent[back[-1]])
                    return [*reversed(back), start]
                if succ not in parent:
                    parent[succ] = node
                    next_frontier.append(succ)
        frontier = next_frontier
    raise ValueError(f"{sorted(members)} is not a cycle of the graph")


def cyclic_components(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components that contain a cycle (several modules, or one importing itself)."""
    return [c for c in strongly_connected_components(graph) if len(c) > 1 or c[0] in graph.get(c[0], ())]


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One closed path per cyclic component, sorted."""
    return sorted(cycle_path(graph, c) for c in cyclic_components(graph))


# ----------------------------------------------------------------------- the package


def test_no_import_cycles_in_the_package():
    graph = import_graph()
    assert len(graph) > 50, f"found only {len(graph)} modules under {PACKAGE_DIR}"
    # Allowances are whole components: a module that joins an allowed cycle makes a new, failing component.
    cyclic = [c for c in cyclic_components(graph) if frozenset(c) not in ALLOWED_CYCLES]
    assert not cyclic, "import cycles (type-only and function-local imports count):\n" + "\n".join(
        f"{' -> '.join(cycle_path(graph, c))}   (all {len(c)} modules of this cycle: {', '.join(c)})" for c in cyclic
    )


def test_allowed_cycles_still_exist():
    # A stale allowance would let the cycle come back unnoticed: delete the entry once the cycle is gone.
    present = {frozenset(c) for c in cyclic_components(import_graph())}
    stale = [sorted(c) for c in ALLOWED_CYCLES if c not in present]
    assert not stale, f"these allowed cycles are gone, delete their entries: {stale}"


# ----------------------------------------------------------------------- the machinery, on synthetic input


def test_cycle_finder_on_a_synthetic_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"d"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["e", "e"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_cycle_path_is_the_shortest_through_the_first_member():
    # a → b → a and a → c → d → a share one component; the report shows the short loop
    graph = {"a": {"b", "c"}, "b": {"a"}, "c": {"d"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "a"]]
    assert cyclic_components(graph) == [["a", "b", "c", "d"]]


def test_strongly_connected_components_survive_a_deep_chain():
    # iterative, so a long chain does not hit the recursion limit
    n = 5000
    graph = {str(i): {str(i + 1)} for i in range(n)} | {str(n): {"0"}}
    (component,) = strongly_connected_components(graph)
    assert len(component) == n + 1


def test_imports_resolve_relative_type_only_and_function_local():
    known = {"pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "pkg.sub.d"}
    source = """
from __future__ import annotations
import os
from typing import TYPE_CHECKING
from . import d
from .. import a
from ..b import something
if TYPE_CHECKING:
    from pkg.sub import c
def f():
    import pkg
"""
    assert imported_modules("pkg.sub.e", False, source, known) == {"pkg.sub.d", "pkg.a", "pkg.b", "pkg.sub.c", "pkg"}
    # in an __init__, "." is the package itself; a name that is not a submodule is an edge to the package
    assert imported_modules("pkg.sub", True, "from . import c, helper\nfrom .c import x", known) == {"pkg.sub.c"}
    assert imported_modules("pkg.a", False, "from pkg.sub import helper\nimport pkg.sub.d", known) == {
        "pkg.sub",
        "pkg.sub.d",
    }


def test_a_type_only_cycle_is_found():
    known = {"pkg", "pkg.x", "pkg.y"}
    x = "from pkg.y import Y\n"
    y = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.x import X\n"
    graph = {
        "pkg": set(),
        "pkg.x": imported_modules("pkg.x", False, x, known),
        "pkg.y": imported_modules("pkg.y", False, y, known),
    }
    assert find_cycles(graph) == [["pkg.x", "pkg.y", "pkg.x"]]
