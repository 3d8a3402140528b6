"""The Kafka package imports without a cycle, and each of its modules imports on its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "worker.kafka"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_path(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


def imports(path: Path) -> set[str]:
    """The modules of the Kafka package that a module imports, at load time or inside functions alike (a
    deferred import still ties the two together), but not for type checking only."""
    out: set[str] = set()
    pending: list[ast.AST] = [ast.parse(path.read_text())]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from worker.kafka import core` imports the module worker.kafka.core
                sub = f"{node.module}.{alias.name}"
                out.add(sub if module_path(sub) is not None else node.module)
        pending.extend(ast.iter_child_nodes(node))
    return {name for name in out if name.startswith(f"{PREFIX}.") and module_path(name) is not None}


def find_cycle(start: str) -> list[str] | None:
    """A cycle of imports within the package reachable from `start`, as the modules around it, or None."""
    done: set[str] = set()
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        if name in stack:
            return [*stack[stack.index(name):], name]
        if name in done:
            return None
        stack.append(name)
        path = module_path(name)
        for imported in sorted(imports(path) if path else ()):
            if (cycle := visit(imported)) is not None:
                return cycle
        stack.pop()
        done.add(name)
        return None

    return visit(start)


MODULES = sorted(map(module_name, ROOT.joinpath("worker", "kafka").rglob("*.py")))


@pytest.mark.parametrize("module", MODULES)
def test_no_import_cycle(module: str) -> None:
    assert find_cycle(module) is None, f"import cycle: {' -> '.join(find_cycle(module) or [])}"


def test_the_cycle_check_finds_a_cycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "worker"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def later() -> None:\n    from worker.b import x\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import worker.c\n"
                                  "from worker import a\nx = 1\n")
    (package / "c.py").write_text("import worker.b\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PREFIX", "worker")
    assert find_cycle("worker.a") == ["worker.a", "worker.b", "worker.a"]
    assert find_cycle("worker.c") == ["worker.b", "worker.a", "worker.b"]


def test_each_module_imports_alone_in_a_fresh_interpreter() -> None:
    """Imported first, each module loads (a cycle that breaks loading raises ImportError here)."""
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    for module in MODULES:
        done = subprocess.run([sys.executable, "-c", script, module], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, check=False)
        assert done.returncode == 0, f"{module}: {done.stderr[-2000:]}"


def test_choosing_a_client_loads_only_that_client() -> None:
    script = ("import sys, worker.kafka, worker.loop\n"
              "assert 'confluent_kafka' not in sys.modules and 'kafka' not in sys.modules, sorted(sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
