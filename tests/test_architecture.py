"""The folder listing is the architecture: each folder imports only its own modules and the folders below it, the
package has no import cycle (``TYPE_CHECKING`` imports included), and nothing below the public faces imports them."""

from __future__ import annotations

import ast
import os

import lightning_monitor

PACKAGE_DIR = os.path.dirname(os.path.abspath(lightning_monitor.__file__))

#: the layers, lowest first: a module may import from its own folder and from any folder of a lower layer
LAYERS = (
    ("_core",),
    ("_writers",),
    ("_run", "_monitor"),
    ("_grad", "_speed", "_memory", "_grid", "_summary", "_health", "_stall", "_act"),
    ("public",),  # the modules at the top: one public class each, cli, testing
    ("package",),  # lightning_monitor/__init__.py: re-exports only
)


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for dirpath, _, files in os.walk(PACKAGE_DIR):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(dirpath, file)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file (inside functions and under
    ``TYPE_CHECKING`` too)."""
    found = set()
    for node in ast.walk(ast.parse(open(MODULES[name], encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name) for name in MODULES}


def _folder(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 1:
        return "package"
    return parts[1] if parts[1].startswith("_") else "public"


def _layer(name: str) -> int:
    return next(i for i, folders in enumerate(LAYERS) if _folder(name) in folders)


def test_every_private_module_lives_in_a_folder_of_a_layer():
    assert {_folder(m) for m in MODULES} == {f for layer in LAYERS for f in layer}
    top = sorted(m for m in MODULES if _folder(m) == "public")
    assert all(not m.split(".")[-1].startswith("_") for m in top), top


def test_no_module_imports_a_folder_above_it_or_beside_it():
    wrong = sorted(
        f"{name} -> {dep}"
        for name, deps in GRAPH.items()
        for dep in deps
        if _folder(dep) != _folder(name) and _layer(dep) >= _layer(name) and _folder(name) != "public"
    )
    assert not wrong, wrong


def test_the_public_faces_are_imported_by_nothing_below_them():
    below = sorted(f"{name} -> {dep}" for name, deps in GRAPH.items() for dep in deps
                   if _folder(dep) == "public" and _folder(name) not in ("public", "package"))
    assert not below, below
    assert not [name for name, deps in GRAPH.items() if "lightning_monitor.multi_logger" in deps
                and name != "lightning_monitor"]


def test_no_import_cycle():
    """Depth-first search for a back edge, over every import of every module (the package's ``__init__`` and
    ``testing``, which imports it inside a function to list the callbacks, left out: that is the one way in)."""
    graph = {m: {d for d in deps if d != "lightning_monitor"} for m, deps in GRAPH.items()
             if m != "lightning_monitor"}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_the_layer_rule_catches_an_upward_import():
    """The rule is not vacuous: the graph holds imports across folders, and an upward one would be named."""
    across = [(n, d) for n, deps in GRAPH.items() for d in deps if _folder(n) != _folder(d)]
    assert len(across) > 20
    name, dep = "lightning_monitor._core.options", "lightning_monitor._writers.backends"
    assert _layer(dep) > _layer(name)  # so an import of it from _core would be listed as wrong
