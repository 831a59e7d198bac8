"""`python -m rtcontrast.research.evaluate`: a wrong input gets one line, figures never overwrite shipped files.

A training checkpoint given where an ONNX model belongs used to end in a 28-line
traceback, and by default the figure overwrote the tracked ``models/NAME.eval.png``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rtcontrast.research.evaluate", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_a_checkpoint_is_refused_in_one_line(tmp_path: Path) -> None:
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"PK\x03\x04 not a model")
    r = run(["--model", str(ckpt)], tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "training checkpoint" in lines[0] and "export_onnx.py" in lines[0], r.stderr
    other = tmp_path / "notes.onnx"
    other.write_text("hello")
    r = run(["--model", str(other)], tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"evaluate: {other} is not an ONNX model (.onnx)"]
    r = run(["--model", str(tmp_path / "missing.onnx")], tmp_path)
    assert r.returncode == 2 and "no such file" in r.stderr


def test_figure_goes_to_the_output_folder_not_next_to_the_model(tmp_path: Path) -> None:
    shipped = REPO / "models" / "qmap-pelvis.eval.png"
    before = shipped.stat().st_mtime_ns
    r = run(["--model", str(REPO / "models" / "qmap-pelvis.onnx"), "--subjects", "1", "--slices", "1",
             "--generalisation", "no"], tmp_path)
    assert "figure: var/evaluate/qmap-pelvis.eval.png" in r.stdout, r.stdout + r.stderr
    assert (tmp_path / "var" / "evaluate" / "qmap-pelvis.eval.png").stat().st_size > 0
    assert shipped.stat().st_mtime_ns == before
