"""The demo series through a running node (#16): every derived object passes the current
dciodvfy, the text a planner reads is right, the maps are masked to the body."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest

from rtcontrast.node.service import Node
from tests.support import LENIENT_QA, REPO, dciodvfy_errors, storescu

pytestmark = pytest.mark.network

DEMO = REPO / "examples" / "phantom-t2w"


def test_demo_series_to_folder_all_objects_valid(tmp_path: Path, make_node: Callable[..., Node]) -> None:
    out = tmp_path / "export"
    protocol = {
        "version": "demo", "qa": LENIENT_QA, "destinations": {"out": {"folder": {"path": str(out)}}},
        "recipes": [
            {"key": "T2w_75", "label": "T2w TE75 TR4500", "te_ms": 75, "tr_ms": 4500, "series_number": 901,
             "destinations": ["out"]},
            {"key": "T1w", "label": "T1w", "te_ms": 8, "tr_ms": 400, "series_number": 902, "destinations": ["out"]},
        ],
        "maps": {"classic": True, "parametric": True, "destinations": ["out"]},
    }
    node = make_node(protocol)
    files = sorted(DEMO.glob("*.dcm"))
    assert storescu(node.port, files).returncode == 0
    assert node.wait_idle(180)
    (job,) = node.jobs.recent_jobs()
    assert job.state == "delivered", (job.state, job.reason)

    written = sorted(out.rglob("*.dcm"))
    assert len(written) == 2 * 16 + 3 * 16 + 3
    with ThreadPoolExecutor(2) as pool:
        errors = dict(zip(written, pool.map(dciodvfy_errors, written)))
    assert {p.name: e for p, e in errors.items() if e} == {}

    src = pydicom.dcmread(files[0], stop_before_pixels=True)
    by_desc: dict[str, list[pydicom.Dataset]] = {}
    for p in written:
        ds = pydicom.dcmread(p)
        by_desc.setdefault(str(ds.SeriesDescription), []).append(ds)
    assert {"SYNTH T2w TE75 TR4500", "SYNTH T1w TE8 TR400", "SYNTH T1 map [ms]", "SYNTH T2 map [ms]",
            "SYNTH T1 parametric map"} <= set(by_desc)
    t2w = by_desc["SYNTH T2w TE75 TR4500"][0]
    assert t2w.ImageComments == (f"synthetic spin echo TE 75 TR 4500 from series {src.SeriesNumber} "
                                 f"'{src.SeriesDescription}', model {node.model.info.name} "
                                 f"{node.model.info.version}, QA passed")
    assert [str(v) for v in t2w.PixelSpacing] == [str(v) for v in src.PixelSpacing]

    # maps: zero outside the body (source <= 5 % of the series scale), real values inside
    from rtcontrast.core.contract import series_scale

    source = {str(pydicom.dcmread(f).SOPInstanceUID): pydicom.dcmread(f).pixel_array.astype(np.float32) for f in files}
    scale = series_scale(np.stack(list(source.values())), node.model.info.input_percentile)
    for ds in by_desc["SYNTH T1 map [ms]"]:
        body = source[ds.SourceImageSequence[0].ReferencedSOPInstanceUID] > 0.05 * scale
        t1 = ds.pixel_array
        assert (t1[~body] == 0).all() and np.median(t1[body]) > 100
        assert "outside the body" in ds.DerivationDescription
    pm = by_desc["SYNTH T1 parametric map"][0]
    assert (pm.pixel_array == 0).mean() > 0.1  # the air around the phantom
