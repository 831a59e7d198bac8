"""The unseen-anatomy split stays unseen: no training code imports the evaluation-only phantoms."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Modules that build training data or train; none may reach rtcontrast.research.eval_phantoms.
TRAINING_MODULES = ("rtcontrast.research.train", "rtcontrast.research.dataset", "rtcontrast.research.dataset_se", "rtcontrast.research.phantom",
                    "rtcontrast.research.random_phantom", "rtcontrast.research.abdomen_phantom", "rtcontrast.research.tissue_prior",
                    "rtcontrast.research.acquisition", "rtcontrast.research.model", "rtcontrast.research.model_se", "rtcontrast.research.realdata_source")


def test_training_modules_do_not_import_eval_phantoms_at_runtime() -> None:
    code = ("import importlib, sys\n"
            f"for m in {TRAINING_MODULES!r}:\n    importlib.import_module(m)\n"
            "bad = sorted(k for k in sys.modules if k.startswith('rtcontrast.research.eval_phantoms'))\n"
            "print(','.join(bad))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"training imports {r.stdout.strip()}"


def test_no_training_source_mentions_eval_phantoms() -> None:
    """Static check (also catches imports inside functions that the runtime check would not execute)."""
    for mod in TRAINING_MODULES:
        path = ROOT / (mod.replace(".", "/") + ".py")
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            assert not any("eval_phantoms" in n for n in names), f"{path.name} imports {names}"


def test_eval_phantoms_do_not_import_training_generators() -> None:
    """Independence the other way: the head phantom is written without the training generators."""
    for path in (ROOT / "rtcontrast" / "eval_phantoms").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(m.startswith("rtcontrast") for m in mods), f"{path.name} imports {mods}"
