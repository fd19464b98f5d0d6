"""The package layout is the architecture: wings import only downwards, and no two modules import each other,
lazily or not. Read from the source (every `import` statement, function bodies included) and checked by importing
every module alone."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lowmem_e5"
WINGS = ("runtime", "quality", "jobs", "serving", "cli")
# What each part may import besides itself. "top" is the package's top-level modules (errors, results, timing,
# environment, default_model, terminal, quiet_imports): what every wing uses, importing no wing.
MAY_IMPORT = {
    "top": {"top"},
    "runtime": {"top"},
    "jobs": {"top", "runtime"},
    "quality": {"top", "runtime", "jobs"},
    "serving": {"top", "runtime", "jobs"},
    "cli": {"top", "runtime", "jobs", "quality", "serving"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that `name` imports anywhere in its source (package __init__s left out)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            candidates = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c in modules and modules[c].name != "__init__.py"}
    return found - {name}


def part(name: str) -> str:
    pieces = name.split(".")
    return pieces[1] if len(pieces) >= 2 and pieces[1] in WINGS else "top"


def test_every_module_lives_in_a_wing_or_is_shared():
    top = sorted(n for n, p in all_modules().items() if part(n) == "top" and p.name != "__init__.py"
                 and p.name != "__main__.py")
    assert top == ["lowmem_e5.default_model", "lowmem_e5.environment", "lowmem_e5.errors", "lowmem_e5.hashing",
                   "lowmem_e5.quiet_imports", "lowmem_e5.results", "lowmem_e5.terminal", "lowmem_e5.timing"]
    for wing in WINGS:
        assert (PACKAGE / wing / "__init__.py").is_file(), f"wing {wing} has no __init__.py"


def test_wings_import_only_downwards():
    modules = all_modules()
    wrong = []
    for name, path in modules.items():
        if name == "lowmem_e5" or path.name == "__main__.py":  # the public API and `python -m` reach everything
            continue
        for target in imports_of(name, path, modules):
            if part(target) != part(name) and part(target) not in MAY_IMPORT[part(name)]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "; ".join(wrong)


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {n: imports_of(n, p, modules) for n, p in modules.items() if p.name != "__init__.py"}


def find_cycles(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycles_even_through_lazy_imports():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_the_checker_sees_a_lazy_cycle(tmp_path, monkeypatch):
    """The cycle test must be able to fail: two modules that import each other, one of them inside a function."""
    pkg = tmp_path / "lowmem_e5"
    (pkg / "runtime").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "runtime" / "__init__.py").write_text("")
    (pkg / "runtime" / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "runtime" / "b.py").write_text("from . import a\n\ndef g():\n    pass\n")
    (pkg / "runtime" / "c.py").write_text("from .a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    assert find_cycles(import_graph()) == ["lowmem_e5.runtime.a -> lowmem_e5.runtime.b -> lowmem_e5.runtime.a"]


def test_every_module_imports_alone():
    """Each module imported first in a clean package state (third-party libraries stay loaded, for speed)."""
    names = [n for n, p in all_modules().items() if p.name != "__main__.py"]
    code = (
        "import importlib, sys, torch, numpy, transformers\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'lowmem_e5' or m.startswith('lowmem_e5.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        print(f'{name}: {type(exc).__name__}: {exc}')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "", result.stdout
