#!/usr/bin/env python3
"""Write a demo spin-echo MR series (a pelvis phantom, fake patient) for trying the node.

    python scripts/make_demo_series.py --out examples/phantom-t2w --te 90 --tr 4000

The README's storescu line sends the committed copy in examples/ to a running node.
No real patient data: the patient is PHANTOM^TEST.

Every DS value is written within DS's 16 characters (400/192 mm = 2.0833333333333335 is 18
characters as Python prints it; dciodvfy flags that, and derived series copy the geometry).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rtcontrast.dicom.derive import fit_ds  # noqa: E402
from rtcontrast.research import phantom  # noqa: E402
from tests.dicomgen import Geometry, make_series, write_series  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="examples/phantom-t2w")
    ap.add_argument("--te", type=float, default=90.0)
    ap.add_argument("--tr", type=float, default=4000.0)
    ap.add_argument("--slices", type=int, default=16)
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--seed", type=int, default=2_000_001, help="phantom seed (outside the training range)")
    ap.add_argument("--field", type=float, default=1.5)
    a = ap.parse_args()
    px = 400.0 / a.size
    maps, _ = phantom.volume(a.seed, n_slices=a.slices, shape=(a.size, a.size), pixel_mm=px, slice_mm=5.0,
                             field_t=a.field)
    acq = phantom.acquire(maps, a.te, a.tr, np.random.default_rng(a.seed), snr=60, bias_strength=0.15, gain=2000)
    vol = np.clip(acq.image, 0, 65535)
    geom = Geometry(pixel_spacing=(px, px), origin=(-200.0 + px / 2, -200.0 + px / 2, -37.5), slice_spacing=5.0,
                    slice_thickness=5.0)
    dss = make_series(vol, te=a.te, tr=a.tr, geometry=geom, series_description=f"T2 SE AX TE{a.te:g} TR{a.tr:g}",
                      uid_seed=f"demo-{a.seed}-{a.te:g}-{a.tr:g}")
    for ds in dss:
        for elem in ds.iterall():
            if elem.VR == "DS" and elem.value not in (None, ""):
                elem.value = fit_ds(elem.value)
    paths = write_series(dss, a.out)
    print(f"wrote {len(paths)} slices to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
