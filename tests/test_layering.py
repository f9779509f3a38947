"""The package's imports flow one way, read from the source with `ast`.

- no module imports the package root (`import ckptstore`, `from ckptstore import x`,
  `from . import x` / `from .. import x` of anything that is not a submodule);
- no module imports another module's private names (`from .x import _y`) or
  reaches into one (`mod._y` where `mod` is a ckptstore module);
- module-level imports between ckptstore modules form no cycle, and the format
  layer (`ckptstore/format/`) imports nothing above it: it knows trees and
  bytes, not where they are stored.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "ckptstore"


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = modules()


def resolve(name: str, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom in module ``name`` names."""
    if node.level == 0:
        return node.module or ""
    is_pkg = MODULES[name].name == "__init__.py"
    base = name.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str, top_level_only: bool) -> list[tuple[str, list[str], ast.AST]]:
    """(module imported, names taken from it, node) for every import in module ``name``."""
    tree = ast.parse(MODULES[name].read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            out.append((resolve(name, node), [a.name for a in node.names], node))
        elif isinstance(node, ast.Import):
            out.extend((a.name, [], node) for a in node.names)
    return out


def test_no_module_imports_the_package_root():
    offenders = []
    for name in MODULES:
        if name == "ckptstore":
            continue
        for target, names, node in imports(name, top_level_only=False):
            if target != "ckptstore":
                continue
            # `from . import sub` of a submodule is an import of that submodule.
            if not names or any(f"ckptstore.{n}" not in MODULES for n in names):
                offenders.append(f"{name}:{node.lineno}")
    assert not offenders, offenders


def test_no_private_name_crosses_a_module_boundary():
    offenders = []
    for name in MODULES:
        ckpt_aliases = {}
        for target, names, node in imports(name, top_level_only=False):
            if not target.startswith("ckptstore"):
                continue
            for n in names:
                if n.startswith("_") and n != "__version__" and f"{target}.{n}" not in MODULES:
                    offenders.append(f"{name}:{node.lineno} imports {target}.{n}")
                if f"{target}.{n}" in MODULES:
                    ckpt_aliases[n] = f"{target}.{n}"
            if isinstance(node, ast.Import):
                for a in node.names:
                    ckpt_aliases[(a.asname or a.name).split(".")[0]] = a.name
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    if a.asname and f"{target}.{a.name}" in MODULES:
                        ckpt_aliases[a.asname] = f"{target}.{a.name}"
        tree = ast.parse(MODULES[name].read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in ckpt_aliases and node.attr.startswith("_") \
                    and not node.attr.startswith("__"):
                offenders.append(f"{name}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not offenders, offenders


def test_module_level_imports_form_no_cycle():
    graph = {}
    for name in MODULES:
        deps = set()
        for target, names, _ in imports(name, top_level_only=True):
            if not target.startswith("ckptstore"):
                continue
            for n in names:
                if f"{target}.{n}" in MODULES:
                    deps.add(f"{target}.{n}")
            if target in MODULES and target != name:
                deps.add(target)
        # A package's __init__ is run before its submodules: importing a.b imports a.
        graph[name] = {d for d in deps if d != name}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if d == "ckptstore":
                continue
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_the_format_layer_imports_nothing_above_it():
    allowed = {"ckptstore.errors"} | {m for m in MODULES if m.startswith("ckptstore.format")}
    offenders = []
    for name in MODULES:
        if not name.startswith("ckptstore.format"):
            continue
        for target, names, node in imports(name, top_level_only=False):
            if target.startswith("ckptstore") and target not in allowed:
                offenders.append(f"{name}:{node.lineno} imports {target}")
    assert not offenders, offenders
