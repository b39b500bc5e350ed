"""The engine's module boundaries: each module imports on its own (no cycles) and no module
reaches for another's private names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import diffpo_sdk

ENGINE = Path(diffpo_sdk.__file__).parent / "engine"
MODULES = sorted(p.stem for p in ENGINE.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("module", MODULES)
def test_each_engine_module_imports_first_in_a_fresh_interpreter(module):
    """A cycle shows when a module in it is the first imported: its partner finds it half-built."""
    proc = subprocess.run([sys.executable, "-c", f"import diffpo_sdk.engine.{module}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_no_private_names_cross_engine_modules():
    crossing = []
    for path in ENGINE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or "diffpo_sdk" in (node.module or "")):
                crossing += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert not crossing


def test_no_engine_module_imports_the_loop_back():
    """The loop (jacobi) sits on top: verify, row, alignment, kvcache and policy never import it."""
    for name in ("verify", "row", "alignment", "kvcache", "policy"):
        tree = ast.parse((ENGINE / f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not imported & {"jacobi", "engine"}, name
