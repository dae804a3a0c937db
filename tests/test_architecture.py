"""Imports flow one way: plugin and cli on top, storage at the bottom (docs/architecture.md).

Every `pytest_ckptparity` import in the package, lazy ones inside functions included, must go
to a module of a lower layer (or the same layer). Imports under `if TYPE_CHECKING:` are
annotations only and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest_ckptparity

# Lowest first. A module may import modules of its own layer or of layers before it.
LAYERS = [
    {"_model", "_paths", "errors", "_native", "_threads", "_run_hooks", "examples"},
    {"storage"},
    {"zarr_rows"},
    {"sources"},
    {"normalize"},
    {"kernel"},
    {"read_in_step"},
    {"read_plan"},
    {"fingerprint"},
    {"diff"},
    {"fingerprint_diff"},
    {"report"},
    {"trajectory"},
    {"_outputs", "drift_page"},
    {"api"},
    {"_session"},
    {"_items"},
    {"_failure", "_fingerprint_plugin"},
    {"plugin", "cli"},
    {"__main__"},
]
RANK = {m: i for i, layer in enumerate(LAYERS) for m in layer}
PACKAGE = Path(pytest_ckptparity.__file__).parent


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    """Line numbers inside `if TYPE_CHECKING:` blocks."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    skip = _type_checking_blocks(tree)
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pytest_ckptparity"):
            parts = node.module.split(".")
            targets = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
            out += [(t, node.lineno) for t in targets if t != "__version__"]
        elif isinstance(node, ast.Import):
            out += [(a.name.split(".")[1], node.lineno) for a in node.names if a.name.startswith("pytest_ckptparity.")]
    return out


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules - set(RANK) == set(), "place the new module in LAYERS (and in docs/architecture.md)"
    assert set(RANK) - modules == set(), "a module in LAYERS no longer exists"


def test_imports_flow_downward():
    upward = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem == "__init__":  # the package's lazy exports name the public modules
            continue
        for target, line in _imports(path):
            if target in RANK and RANK[target] > RANK[path.stem]:
                upward.append(f"{path.name}:{line} imports {target}")
    assert upward == []


def test_the_check_sees_an_upward_import(tmp_path):
    """The checker itself: a lazy import from a lower module to a higher one is caught."""
    probe = tmp_path / "sources.py"
    probe.write_text("def f():\n    from pytest_ckptparity.api import open_checkpoint\n    return open_checkpoint\n")
    assert _imports(probe) == [("api", 2)] and RANK["api"] > RANK["sources"]
