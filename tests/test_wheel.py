"""A built wheel is a working install: every subpackage inside, the console script runs.

The layout split the package into subpackages; a wheel that listed only the top-level
package would install a node that cannot import its own modules.  This builds the
wheel from the checkout, installs it (without dependencies) into a fresh virtual
environment that borrows the test environment's third-party packages, and runs the
``rtcontrast`` console script from a folder outside the checkout.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    env = {**os.environ, "TMPDIR": str(build)}
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=300, env=env, cwd=build)
    assert r.returncode == 0, r.stderr[-2000:]
    wheels = list(out.glob("rtcontrast-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contains_every_subpackage(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(REPO)) for p in (REPO / "rtcontrast").rglob("*.py") if "__pycache__" not in p.parts}
    missing = sorted(expected - names)
    assert not missing, f"the wheel lacks {missing}"
    assert any(n.endswith("entry_points.txt") for n in names)


def test_installed_wheel_runs_the_console_script(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # Third-party packages from the test environment, after the venv's own site-packages
    # (a plain path line: the test environment's editable rtcontrast finder is not activated).
    (Path(purelib) / "borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # Without PYTHONPATH: a checkout on it (with the egg-info the wheel build leaves) would make pip
    # think rtcontrast is installed already and skip the wheel.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                        str(wheel)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    exe = venv / "bin" / "rtcontrast"
    assert exe.exists()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    r = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60, cwd=outside, env=env)
    assert r.returncode == 0 and r.stdout.strip().startswith("rtcontrast "), r.stdout + r.stderr
    where = subprocess.run([str(py), "-c", "import rtcontrast.node.receive.scp as m; print(m.__file__)"],
                           capture_output=True, text=True, timeout=60, cwd=outside, env=env).stdout
    assert where.startswith(purelib), f"imported from {where!r}, not from the installed wheel"
    cfg = outside / "node.yaml"
    cfg.write_text(f"model_path: {REPO / 'models' / 'qmap-pelvis.onnx'}\nvar_dir: {outside / 'var'}\n")
    r = subprocess.run([str(exe), "check-config", "--config", str(cfg)], capture_output=True, text=True,
                       timeout=120, cwd=outside, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("OK: node") and "qmap-pelvis" in r.stdout, r.stdout
    bad = outside / "bad.yaml"
    bad.write_text("port: not-a-port\n")
    r = subprocess.run([str(exe), "check-config", "--config", str(bad)], capture_output=True, text=True,
                       timeout=120, cwd=outside, env=env)
    assert r.returncode != 0 and "port" in r.stderr, r.stdout + r.stderr
