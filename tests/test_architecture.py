"""The layering of the package, checked from the source (no imports executed).

Layers, lowest first (``docs/architecture.md``): the NCA core (``nca``, with the two utility
modules ``fileutil`` and ``resources``); backends and formats beside each other (``backends``,
``io``); the run layer (``run``); the shells (CLI, widgets, napari adapters, demo, benchmarks).
A module may import its own layer or lower ones, never higher ones; ``backends`` and ``io`` never
import each other; and no two modules import each other, directly or in a circle, even lazily.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "napari_octreenca"
ROOT = "napari_octreenca"

#: (prefix, layer): the first matching prefix wins; anything else is a shell (layer 3).
LAYERS = [
    (f"{ROOT}.nca", 0),
    (f"{ROOT}.fileutil", 0),
    (f"{ROOT}.resources", 0),
    (f"{ROOT}.backends", 1),
    (f"{ROOT}.io", 1),
    (f"{ROOT}.run", 2),
]
SIBLINGS_APART = {(f"{ROOT}.backends", f"{ROOT}.io"), (f"{ROOT}.io", f"{ROOT}.backends")}


def layer_of(module: str) -> int:
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return 3


def _module_name(path: Path) -> tuple[str, bool]:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    is_pkg = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_pkg else parts), is_pkg


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = module.split(".") if is_pkg else module.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    # ``from pkg import name`` may import a submodule ``pkg.name``
    return [base] + [f"{base}.{a.name}" for a in node.names]


def internal_imports() -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its body (lazy imports included)."""
    modules = {_module_name(p)[0]: p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        _, is_pkg = _module_name(path)
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                cands = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                cands = _resolve(name, is_pkg, node)
            else:
                continue
            targets.update(c for c in cands if c in modules and c != name)
        graph[name] = targets
    return graph


def test_no_module_imports_a_higher_layer() -> None:
    bad = []
    for module, targets in internal_imports().items():
        for t in targets:
            if t == ROOT:
                continue  # the package's lazy public API; checked by the cycle test below
            if layer_of(t) > layer_of(module):
                bad.append(f"{module} (layer {layer_of(module)}) imports {t} (layer {layer_of(t)})")
            for a, b in SIBLINGS_APART:
                if module.startswith(a) and t.startswith(b):
                    bad.append(f"{module} imports its sibling layer {t}")
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_no_import_circles() -> None:
    graph = internal_imports()

    # A package __init__ that only re-exports its own submodules is not a circle with them.
    def edges(m: str) -> set[str]:
        return {t for t in graph.get(m, ()) if not (m.startswith(t + ".") and t in graph)}

    seen: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        seen[m] = 1
        stack.append(m)
        for t in sorted(edges(m)):
            if seen.get(t) == 1:
                cycles.append(stack[stack.index(t) :] + [t])
            elif t not in seen:
                visit(t)
        stack.pop()
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_a_planted_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks above can fail: an nca module importing run is reported."""
    fake = tmp_path / ROOT
    (fake / "nca").mkdir(parents=True)
    (fake / "run").mkdir()
    for p in (fake / "__init__.py", fake / "nca" / "__init__.py", fake / "run" / "__init__.py"):
        p.write_text("")
    (fake / "nca" / "bad.py").write_text("def f():\n    from ..run import thing\n")
    (fake / "run" / "thing.py").write_text("from ..nca import bad\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    with pytest.raises(AssertionError, match="napari_octreenca.nca.bad"):
        test_no_module_imports_a_higher_layer()
    with pytest.raises(AssertionError, match="import circles"):
        test_no_import_circles()


@pytest.mark.parametrize("modules", ["napari_octreenca", "napari_octreenca, napari_octreenca.napari_io"])
def test_package_and_napari_entry_points_import_neither_torch_nor_numba(modules: str) -> None:
    """napari imports the reader/writer module whenever it asks this plugin about a file."""
    code = (
        f"import sys; import {modules}; "
        "heavy = sorted(m for m in ('torch', 'numba') if m in sys.modules); print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing {modules} imported {out.stdout.strip()}"
