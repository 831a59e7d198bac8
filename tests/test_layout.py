"""The package layout is the architecture: these rules keep it that way.

* ``rtcontrast.core`` (the science shared by node and research) imports no other
  rtcontrast package but itself;
* ``rtcontrast.dicom`` (objects, no network, no database) imports only core and settings;
* ``rtcontrast.settings`` (schemas) imports nothing of the node's or research's;
* the clinical node never imports the research loop (torch, phantoms), and research
  never imports the node (its network stack, its database);
* no module is over 600 lines (one concern per module).

The rules are checked on the source (every ``import``/``from`` statement, also inside
functions), so a lazy import cannot slip past them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "rtcontrast"
MAX_LINES = 600

#: package -> rtcontrast packages it may import (besides itself and the top-level rtcontrast).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "settings": set(),
    "dicom": {"core", "settings"},
    "node": {"core", "dicom", "settings"},
    "research": {"core", "dicom", "settings"},
}


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _package_of(path: Path) -> str | None:
    rel = path.relative_to(PKG).parts
    return rel[0] if len(rel) > 1 else None


def _rtcontrast_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported rtcontrast sub-package) for every import statement in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "rtcontrast" else [f"rtcontrast.{a.name}" for a in node.names]
        for n in names:
            parts = n.split(".")
            if parts[0] == "rtcontrast" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


def test_every_module_belongs_to_a_package() -> None:
    """Only the package's __init__ sits at the top: every concern has its room."""
    loose = [p.name for p in PKG.glob("*.py") if p.name != "__init__.py"]
    assert loose == [], f"modules outside the subpackages: {loose}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_import_rules(path: Path) -> None:
    pkg = _package_of(path)
    if pkg is None:
        return
    assert pkg in ALLOWED, f"unknown package {pkg!r}: add it to ALLOWED with its rule"
    bad = [(line, sub) for line, sub in _rtcontrast_imports(path)
           if sub != pkg and sub not in ALLOWED[pkg] and sub != "__version__"]
    assert bad == [], f"{path.relative_to(PKG)} imports {', '.join(f'rtcontrast.{s} (line {n})' for n, s in bad)}; " \
                      f"rtcontrast.{pkg} may import only {sorted(ALLOWED[pkg]) or 'nothing else'}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_module_size(path: Path) -> None:
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(PKG)} has {n} lines (> {MAX_LINES}): split it by concern"


def test_rule_checker_sees_a_violation(tmp_path: Path) -> None:
    """The checker itself must be able to fail: a lazy research import inside a function is found."""
    mod = tmp_path / "m.py"
    mod.write_text("def f():\n    from rtcontrast.research import train\n    import rtcontrast.node.service\n")
    assert _rtcontrast_imports(mod) == [(2, "research"), (3, "node")]
