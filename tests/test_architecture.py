"""The package's shape: no import cycles (function-local imports included), numerics free of
pytest and files, the plugin module and the CLI's --help light.

Imports are read from the source with `ast`, not by importing, so a cycle hidden behind a
function-local import is found as surely as a top-level one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tokenwise_harness

PKG = Path(tokenwise_harness.__file__).resolve().parent
NAME = "tokenwise_harness"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `path` imports anywhere in its body (top level or inside functions)."""
    this = _module_name(path)
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = this.split(".") if is_pkg else this.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name.startswith(NAME) and name != this:
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_reader_sees_function_local_imports(tmp_path):
    mod = PKG / "engine.py"
    assert f"{NAME}.numerics.svdq" in _imports(mod, _modules())  # imported inside evaluate_grid


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_numerics_import_neither_pytest_nor_files():
    forbidden_pkgs = {"pytest", "_pytest", "safetensors", "json", "pathlib", "os", "shutil", "yaml"}
    forbidden_own = {f"{NAME}.{m}" for m in ("cache", "checkpoint", "atomic", "run", "engine")}
    for path in (PKG / "numerics").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in forbidden_pkgs, f"{path.name} imports {name}"
                assert not any(name == m or name.startswith(m + ".") for m in forbidden_own), f"{path.name} imports {name}"
        assert "open(" not in path.read_text(encoding="utf-8"), f"{path.name} opens files"


def test_layers_only_import_forward():
    """Lower layers never import the front ends (the CLI, the pytest plugin, the demo)."""
    graph = _graph()
    front = (f"{NAME}.cli", f"{NAME}.pytest_plugin", f"{NAME}.demo", f"{NAME}.__main__")
    for mod, deps in graph.items():
        if mod.startswith(front):
            continue
        bad = sorted(d for d in deps if d.startswith(front))
        assert not bad, f"{mod} imports front end(s) {bad}"


def test_plugin_module_loads_without_torch():
    code = ("import sys, tokenwise_harness.pytest_plugin.hooks; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
