"""The package's shape: one-way imports between subpackages, no import cycles, thin entry points.

Every ``import`` / ``from ... import`` in ``vitacore/`` is read with ``ast``, function-local ones
included (an import hidden in a function is still a dependency). The rules are DESIGN.md's:

- no cycle between vitacore's subpackages (and top-level modules), nor between its files;
- ``freeze`` imports nothing from engine / checkpoint / model / data / recipes / demo;
- ``data`` nothing from model / engine / checkpoint / recipes;
- ``model`` nothing from engine / checkpoint / recipes / demo;
- ``engine`` and ``checkpoint`` nothing from recipes / demo, and ``checkpoint`` not engine;
- only the package face (``vitacore/__init__.py``), ``recipes/`` and entry points import ``recipes``.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "vitacore")
SUBPACKAGES = ("checkpoint", "data", "demo", "engine", "freeze", "model", "recipes")
FORBIDDEN = {
    "freeze": {"engine", "checkpoint", "model", "data", "recipes", "demo"},
    "data": {"model", "engine", "checkpoint", "recipes"},
    "model": {"engine", "checkpoint", "recipes", "demo"},
    "engine": {"recipes", "demo"},
    "checkpoint": {"recipes", "demo", "engine"},
}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name of the file
    target: str  # the most specific vitacore module the statement names
    line: int
    local: bool  # inside a function

    def __str__(self) -> str:
        where = "function-local " if self.local else ""
        return f"{self.importer} (line {self.line}) {where}imports {self.target}"


def module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def all_modules(root: str = PACKAGE) -> dict[str, str]:
    """Dotted name -> file, for every .py file under ``root``."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                found[module_name(os.path.join(folder, name))] = os.path.join(folder, name)
    return found


def _target(name: str, modules: dict[str, str], imported: str | None = None) -> str | None:
    """The most specific known module named by ``from name import imported`` (or ``import name``)."""
    if imported and f"{name}.{imported}" in modules:
        return f"{name}.{imported}"
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(path: str, modules: dict[str, str]) -> list[Import]:
    """The vitacore modules ``path`` imports, with line numbers and whether the import is function-local."""
    importer = module_name(path)
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    local = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
             for node in ast.walk(fn)}
    package = importer if path.endswith("__init__.py") else importer.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against this file's package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [(base, alias.name) for alias in node.names]
        else:
            continue
        for name, imported in names:
            if name == "vitacore" or name.startswith("vitacore."):
                target = _target(name, modules, imported)
                if target and target != importer:
                    found.append(Import(importer, target, node.lineno, id(node) in local))
    return list(dict.fromkeys(found))  # `from m import a, b` is one dependency


def component(module: str) -> str | None:
    """The layering unit of a module: its subpackage, or the top-level module itself; None for the face
    and entry points (``__main__``), which may import anything and are imported by nothing."""
    parts = module.split(".")
    if module == "vitacore" or parts[-1] == "__main__":
        return None
    return parts[1]


def package_graph_edges(modules: dict[str, str]) -> list[Import]:
    return [imp for path in modules.values() for imp in imports_of(path, modules)]


def file_graph(edges: list[Import]) -> dict[str, set[str]]:
    """Module -> modules it imports, including the package ``__init__`` a cross-package import runs."""
    graph: dict[str, set[str]] = {}
    for imp in edges:
        if component(imp.importer) is None:
            continue
        targets = {imp.target}
        parent = imp.target.rpartition(".")[0]
        # Importing vitacore.x.y from outside vitacore.x first runs vitacore/x/__init__.py.
        if parent and parent != "vitacore" and not imp.importer.startswith(parent + "."):
            targets.add(parent)
        graph.setdefault(imp.importer, set()).update(t for t in targets if t != "vitacore")
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            members = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                members.append(member)
                if member == node:
                    break
            if len(members) > 1:
                found.append(sorted(members))

    for node in sorted(set(graph) | {t for ts in graph.values() for t in ts}):
        if node not in index:
            visit(node)
    return found


@pytest.fixture(scope="module")
def edges() -> list[Import]:
    return package_graph_edges(all_modules())


def test_no_import_cycle_between_files(edges):
    found = cycles(file_graph(edges))
    assert not found, "import cycles between files (each line: modules that import each other, directly or not):\n" + \
        "\n".join(", ".join(c) for c in found)


def test_no_import_cycle_between_subpackages(edges):
    graph: dict[str, set[str]] = {}
    for imp in edges:
        source, target = component(imp.importer), component(imp.target)
        if source and target and source != target:
            graph.setdefault(source, set()).add(target)
    found = cycles(graph)
    witnesses = sorted({str(imp) for imp in edges for cycle in found
                        if component(imp.importer) in cycle and component(imp.target) in cycle
                        and component(imp.importer) != component(imp.target)})
    assert not found, f"import cycles between subpackages {found}:\n" + "\n".join(witnesses)


def test_subpackages_import_only_downwards(edges):
    broken = [f"{imp}: `{component(imp.importer)}` must not import `{component(imp.target)}`"
              for imp in edges if component(imp.target) in FORBIDDEN.get(component(imp.importer), ())]
    assert not broken, "forbidden imports:\n" + "\n".join(broken)


def test_only_the_face_recipes_and_entry_points_import_recipes(edges):
    broken = [str(imp) for imp in edges if component(imp.target) == "recipes"
              and component(imp.importer) not in (None, "recipes")]
    assert not broken, "only vitacore/__init__.py, vitacore/recipes/ and entry points may import recipes:\n" + \
        "\n".join(broken)


def test_no_function_local_vitacore_imports(edges):
    """Function-local imports used to hide cycles; none is left (none guards an optional dependency)."""
    local = [str(imp) for imp in edges if imp.local]
    assert not local, "function-local vitacore imports (import at the top, or fix the layering):\n" + "\n".join(local)


def test_files_stay_under_400_lines():
    long = {name: sum(1 for _ in open(path, encoding="utf-8")) for name, path in all_modules().items()}
    assert not {n: c for n, c in long.items() if c > 400}, {n: c for n, c in long.items() if c > 400}


def test_examples_are_thin_entry_points():
    with open(os.path.join(REPO, "examples", "train_stage.py"), encoding="utf-8") as fh:
        assert sum(1 for _ in fh) <= 60
    with open(os.path.join(REPO, "examples", "custom_script.py"), encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    used = {n.attr for n in ast.walk(tree)  # vitacore.X
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "vitacore"}
    used |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("vitacore")
             for a in n.names}
    assert used and not used & {"parse_args", "RunConfig", "config"}, \
        f"custom_script.py must build its Trainer without vitacore's VITA flag parser; it uses {sorted(used)}"


def test_the_checker_sees_what_it_must(tmp_path):
    """The checker itself: a planted forbidden, function-local import and a planted cycle are found."""
    root = tmp_path / "vitacore"
    for sub in ("freeze", "engine"):
        (root / sub).mkdir(parents=True)
        (root / sub / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "freeze" / "policy.py").write_text("def f():\n    from vitacore.engine.loop import Trainer\n")
    (root / "engine" / "loop.py").write_text("import vitacore.freeze.policy\n")
    global REPO
    saved, REPO = REPO, str(tmp_path)
    try:
        planted = package_graph_edges(all_modules(str(root)))
    finally:
        REPO = saved
    assert [str(i) for i in planted if i.local] == [
        "vitacore.freeze.policy (line 2) function-local imports vitacore.engine.loop"]
    assert cycles(file_graph(planted)) == [["vitacore.engine.loop", "vitacore.freeze.policy"]]
    assert any(component(i.target) in FORBIDDEN[component(i.importer)] for i in planted
               if component(i.importer) == "freeze")
