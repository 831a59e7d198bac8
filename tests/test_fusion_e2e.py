"""Fusion end to end: a T1w and a T2w series of one frame of reference -> the TPS gets derived
series whose lineage references both (dcmtk storescu as the scanner, Orthanc as the TPS)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rtcontrast.research import phantom
from rtcontrast.core.inference import QMapModel
from tests.dicomgen import Geometry, make_series, write_series
from tests.orthanc import Orthanc, orthanc  # noqa: F401  (fixture)
from tests.support import LENIENT_QA, REPO, storescu, wait_for

FUSION_MODEL = REPO / "models" / "qmap-pelvis-fusion.onnx"


@pytest.fixture(scope="module")
def model() -> QMapModel:  # overrides test_node_e2e's single-input model for make_node
    m = QMapModel(FUSION_MODEL, "cpu")
    assert m.info.fusion and m.info.max_inputs >= 2
    return m


def _series(tmp: Path, te: float, tr: float, number: int, size: int = 64, n: int = 6) -> list[Path]:
    maps, _ = phantom.volume(2_000_077, n_slices=n, shape=(size, size), pixel_mm=6.0, slice_mm=8.0, field_t=1.5)
    img = phantom.acquire(maps, te, tr, np.random.default_rng(number), snr=60, bias_strength=0.1, gain=1500).image
    geom = Geometry(pixel_spacing=(6.0, 6.0), origin=(-190.0, -190.0, -20.0), slice_spacing=8.0, slice_thickness=8.0)
    dss = make_series(np.clip(img, 0, 65535), te=te, tr=tr, geometry=geom, uid_seed="fusion-e2e", series_number=number,
                      series_description=f"SE TE{te:g} TR{tr:g}")
    return write_series(dss, tmp / f"s{number}")


def _protocol(version: str, orthanc_port: int, **fusion: object) -> dict:
    """One T2w recipe to the TPS (Orthanc), lenient QA, fusion on with the given settings.

    Lenient QA: these tests check which partners are fused and where the result goes; the
    coarse 6 mm phantom is not a QA case (QA is pinned in tests/test_pins_qa.py).
    """
    return {
        "version": version,
        "qa": LENIENT_QA,
        "destinations": {"tps": {"dicom": {"host": "127.0.0.1", "port": orthanc_port, "ae_title": "ORTHANC",
                                           "connect_timeout_s": 2, "acse_timeout_s": 5}}},
        "recipes": [{"key": "T2w", "label": "T2w", "te_ms": 100, "tr_ms": 4000, "series_number": 901,
                     "destinations": ["tps"]}],
        "fusion": {"enabled": True, **fusion},
    }


def test_t1w_and_t2w_fused_lineage_references_both(tmp_path: Path, orthanc: Orthanc, make_node) -> None:  # noqa: F811
    protocol = _protocol("fusion-e2e", orthanc.dicom_port, wait_for_partner_s=30)
    node = make_node(protocol, metrics={"enabled": False})
    t1 = _series(tmp_path, 8.0, 500.0, 3)
    t2 = _series(tmp_path, 90.0, 4000.0, 4)
    # two associations, as a scanner sends two series; the first waits for its partner
    assert storescu(node.port, t1).returncode == 0
    assert storescu(node.port, t2).returncode == 0
    src_uids = {str(__import__("pydicom").dcmread(p[0], stop_before_pixels=True).SeriesInstanceUID) for p in (t1, t2)}

    def derived() -> list:
        got = [orthanc.dataset(u) for u in orthanc.sop_instance_uids()]
        series = {str(d.SeriesInstanceUID) for d in got if "SYNTH" in str(d.get("SeriesDescription", ""))}
        return got if len(series) == 2 and len(got) == 12 else []

    got = wait_for(derived, 90, "both derived series in Orthanc")
    for ds in got:
        refs = {str(it.SeriesInstanceUID) for it in ds.ReferencedSeriesSequence}
        assert refs == src_uids, refs
        assert {str(it.SeriesInstanceUID) for it in ds.RelatedSeriesSequence} == src_uids
        assert "fused with series" in str(ds.DerivationDescription)
        # same grid: each derived slice references the source slice of both series
        assert len(ds.SourceImageSequence) == 2
    jobs = node.jobs.recent_jobs(10)
    fused = [j for j in jobs if j.qa and j.qa.get("fusion", {}).get("partners")]
    assert len(fused) == 2
    # data consistency is on by default: each fused job records the partner's gain relative to its own series
    assert all(len(j.qa["fusion"]["input_gains"]) == 2 and j.qa["fusion"]["input_gains"][0] == 1.0 for j in fused)


def test_target_rule_t2w_gives_output_for_the_t2w_series_only(tmp_path: Path, orthanc: Orthanc, make_node) -> None:  # noqa: F811
    """fusion.target: t2w -> the T2w series gets the fused derived series (lineage: both sources); the T1w series
    is an input only: its job ends ineligible with a reason naming the target, and nothing of its own is sent."""
    import pydicom

    from rtcontrast.node.pipeline import PARTNER_ONLY

    protocol = _protocol("fusion-target", orthanc.dicom_port, wait_for_partner_s=30, target="t2w")
    node = make_node(protocol, metrics={"enabled": False})
    t1 = _series(tmp_path, 8.0, 500.0, 5)
    t2 = _series(tmp_path, 90.0, 4000.0, 6)
    assert storescu(node.port, t1).returncode == 0
    assert storescu(node.port, t2).returncode == 0
    t1_uid, t2_uid = (str(pydicom.dcmread(p[0], stop_before_pixels=True).SeriesInstanceUID) for p in (t1, t2))

    def settled() -> list:
        jobs = node.jobs.recent_jobs(10)
        return jobs if len(jobs) == 2 and all(j.state in ("ineligible", "queued", "delivered") for j in jobs) else []

    jobs = {j.series_uid: j for j in wait_for(settled, 90, "both jobs settled")}
    assert jobs[t1_uid].state == "ineligible" and jobs[t1_uid].reason.startswith(PARTNER_ONLY), jobs[t1_uid]
    assert t2_uid in jobs[t1_uid].reason
    assert jobs[t2_uid].qa["fusion"]["partners"] == [t1_uid]

    def derived() -> list:
        got = [orthanc.dataset(u) for u in orthanc.sop_instance_uids()]
        return got if len(got) == 6 else []

    got = wait_for(derived, 90, "the T2w series' derived instances in Orthanc")
    for ds in got:
        assert {str(it.SeriesInstanceUID) for it in ds.ReferencedSeriesSequence} == {t1_uid, t2_uid}
    assert len({str(ds.SeriesInstanceUID) for ds in got}) == 1
    # every T2w slice is the source of a derived slice (the output is on the T2w series' grid)
    t2_sops = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in t2}
    referenced = {str(it.ReferencedSOPInstanceUID) for ds in got for it in ds.SourceImageSequence}
    assert t2_sops <= referenced


def test_target_rule_never_defers_to_a_target_that_ran_without_it(tmp_path: Path, orthanc: Orthanc,  # noqa: F811
                                                                  make_node) -> None:
    """No waiting: the T2w (target) arrives and is processed alone first; the T1w that arrives later must not defer
    to it (its data would reach the TPS nowhere): it gets derived series of its own, fused with the T2w."""
    import pydicom

    protocol = _protocol("fusion-target-late", orthanc.dicom_port, wait_for_partner_s=0, target="t2w")
    node = make_node(protocol, metrics={"enabled": False})
    t1 = _series(tmp_path, 8.0, 500.0, 7)
    t2 = _series(tmp_path, 90.0, 4000.0, 8)
    t1_uid, t2_uid = (str(pydicom.dcmread(p[0], stop_before_pixels=True).SeriesInstanceUID) for p in (t1, t2))
    assert storescu(node.port, t2).returncode == 0
    wait_for(lambda: [j for j in node.jobs.recent_jobs(5) if j.state in ("queued", "delivered")], 60, "T2w job done")
    assert storescu(node.port, t1).returncode == 0

    def settled() -> list:
        jobs = node.jobs.recent_jobs(10)
        return jobs if len(jobs) == 2 and all(j.state in ("ineligible", "queued", "delivered") for j in jobs) else []

    jobs = {j.series_uid: j for j in wait_for(settled, 90, "both jobs settled")}
    assert jobs[t1_uid].state in ("queued", "delivered"), jobs[t1_uid]
    assert jobs[t1_uid].qa["fusion"]["partners"] == [t2_uid]
    assert "processed without this series" in jobs[t1_uid].qa["fusion"]["note"]
    got = wait_for(lambda: (lambda g: g if len(g) == 12 else [])(
        [orthanc.dataset(u) for u in orthanc.sop_instance_uids()]), 90, "both derived series in Orthanc")
    assert len({str(ds.SeriesInstanceUID) for ds in got}) == 2
