"""Licence hygiene (#16): no GPL in the default install, JPEG Lossless / JPEG-LS decode without the GPL plugin."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from rtcontrast.node.ops.licences import declared_requirements, dependency_closure, is_strong_copyleft, main

REPO = Path(__file__).resolve().parent.parent


def test_default_install_closure_has_no_gpl() -> None:
    dists, missing = dependency_closure(declared_requirements(REPO / "pyproject.toml"))
    names = {d.name.lower() for d in dists}
    assert {"pydicom", "pynetdicom", "highdicom", "python-gdcm", "pyjpegls"} <= names, names
    assert "pylibjpeg-libjpeg" not in names
    bad = [(d.name, d.licence) for d in dists if is_strong_copyleft(d.licence)]
    assert bad == [], bad
    assert missing == [], f"declared but not installed: {missing}"
    assert main(["--pyproject", str(REPO / "pyproject.toml")]) == 0


def test_gpl_is_detected() -> None:
    for gpl in ("GPL V3.0", "GPL-3.0-or-later", "GNU General Public License v3 (GPLv3)", "AGPL-3.0-only"):
        assert is_strong_copyleft(gpl), gpl
    for ok in ("MIT", "Apache-2.0", "LGPL-2.1-or-later", "GNU Lesser General Public License v3 (LGPLv3)",
               "BSD-3-Clause", "MPL-2.0 AND MIT"):
        assert not is_strong_copyleft(ok), ok
    try:
        from importlib.metadata import version

        version("pylibjpeg-libjpeg")
    except Exception:
        pytest.skip("pylibjpeg-libjpeg not installed: the opt-in extra cannot be checked here")
    assert main(["--pyproject", str(REPO / "pyproject.toml"), "--extra", "gpl-jpeg"]) == 1


_DECODE = """
import sys
sys.path.insert(0, sys.argv[1])
import numpy as np, pydicom
ref = pydicom.dcmread(sys.argv[2]).pixel_array
import importlib.util
assert importlib.util.find_spec("libjpeg") is None, "libjpeg still importable"
for f in sys.argv[3:]:
    ds = pydicom.dcmread(f)
    assert np.array_equal(ds.pixel_array, ref), f
    print(ds.file_meta.TransferSyntaxUID, "ok")
"""


def test_jpeg_lossless_and_jpeg_ls_decode_without_the_gpl_plugin(tmp_path: Path) -> None:
    """Decode dcmtk-made JPEG Lossless (.57, .70) and JPEG-LS (.80) in an interpreter that
    sees the venv's packages except pylibjpeg-libjpeg (so this proves it on a machine where
    the GPL plugin is installed too)."""
    if not (shutil.which("dcmcjpeg") and shutil.which("dcmcjpls")):
        pytest.skip("dcmtk not installed")
    src = get_testdata_file("MR_small.dcm")
    files = []
    for tool, flag, name in (("dcmcjpeg", "+el", "p14.dcm"), ("dcmcjpeg", "+e1", "sv1.dcm"), ("dcmcjpls", "+el", "ls.dcm")):
        out = tmp_path / name
        subprocess.run([tool, flag, src, str(out)], check=True, timeout=60, capture_output=True)
        files.append(str(out))
    site = Path(sysconfig.get_paths()["purelib"])
    filtered = tmp_path / "site"
    filtered.mkdir()
    for entry in site.iterdir():
        if not entry.name.lower().startswith(("libjpeg", "pylibjpeg_libjpeg")):
            (filtered / entry.name).symlink_to(entry)
    r = subprocess.run([sys.executable, "-S", "-c", _DECODE, str(filtered), src, *files], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["1.2.840.10008.1.2.4.57", "ok", "1.2.840.10008.1.2.4.70", "ok",
                                "1.2.840.10008.1.2.4.80", "ok"], r.stdout
