"""Importing a researcher's own spin-echo export (rtcontrast.research.importer) from a real-like folder."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rtcontrast.research import importer
from rtcontrast.research.importer import ImportReport, load_series, patient_hash, scan
from tests.realdata import build_real_like_dataset

HAS_NIBABEL = importlib.util.find_spec("nibabel") is not None
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("export")
    return root, build_real_like_dataset(root)


@pytest.fixture(scope="module")
def report(dataset: tuple[Path, dict[str, Any]]) -> ImportReport:
    return scan(dataset[0])


def _by_uid(report: ImportReport) -> dict[str, importer.SeriesInfo]:
    return {s.series_uid: s for s in report.series}


def test_counts_and_series(dataset: tuple[Path, dict[str, Any]], report: ImportReport) -> None:
    _, d = dataset
    assert len(report.patients) == 3
    assert len(report.series) == 4
    series = _by_uid(report)
    for name in d["eligible"]:
        exp = d["series"][name]
        s = series[exp["series_uid"]]
        pid = d["patients"][exp["patient"]]["patient_id"]
        assert s.patient_hash == patient_hash(pid) and len(s.patient_hash) == 12
        assert (s.te_ms, s.tr_ms) == (exp["te"], exp["tr"])
        assert (s.n_slices, s.rows, s.cols) == exp["shape"]
        assert s.for_uid == exp["for_uid"]
        assert s.source == "dicom"
        assert s.recognised.startswith("eligible: spin-echo")
    # classic series list every slice file once (the duplicate copy is not counted twice)
    assert len(series[d["series"]["A_T1w"]["series_uid"]].paths) == 4
    assert len(series[d["series"]["C_T1w"]["series_uid"]].paths) == 1  # one Enhanced MR object
    assert report.contrasts == {(8.0, 500.0): 1, (12.0, 600.0): 1, (90.0, 4000.0): 2}


def test_paired_group(dataset: tuple[Path, dict[str, Any]], report: ImportReport) -> None:
    _, d = dataset
    assert len(report.paired_groups) == 1
    g = report.paired_groups[0]
    a_t1, a_t2 = (d["series"][n] for n in d["paired"][0])
    assert g.patient_hash == patient_hash(d["patients"]["A"]["patient_id"])
    assert g.for_uid == a_t1["for_uid"] == a_t2["for_uid"]
    assert {s.series_uid for s in g.series} == {a_t1["series_uid"], a_t2["series_uid"]}
    assert g.contrasts == [(8.0, 500.0), (90.0, 4000.0)]
    assert g.same_matrix
    # patient B has a T2w only: one series, no group; patient C's skipped series do not pair
    assert all(len(v) == 1 for k, v in report.patients.items() if k != g.patient_hash)


def test_skipped_with_reasons(dataset: tuple[Path, dict[str, Any]], report: ImportReport) -> None:
    root, d = dataset
    reasons = dict(report.skipped)
    sk = d["skipped"]

    def series_reason(uid: str) -> str:
        hits = [r for w, r in report.skipped if w.startswith(f"series {uid}")]
        assert len(hits) == 1, (uid, report.skipped)
        return hits[0]

    assert series_reason(sk["gradient_echo"]) == "ScanningSequence 'GR' is gradient echo: not spin-echo"
    assert series_reason(sk["ct"]) == "Modality 'CT' is not MR"
    assert series_reason(sk["te_missing"]) == "TE missing"
    assert reasons[sk["text"]].startswith("not DICOM")
    assert "truncated" in reasons[sk["truncated"]]
    dups = [r for _, r in report.skipped if r.startswith("duplicate: same SOP instance")]
    assert len(dups) == 1
    assert len(report.skipped) == 6
    # nothing silently dropped: every file is in a series or skipped
    in_series = {p for s in report.series for p in s.paths}
    skipped_files = {Path(w) for w, _ in report.skipped if not w.startswith("series ")}
    n_series_skipped_files = 2 + 2 + 4  # CT, SE without TE, GRE
    assert len(in_series) + len(skipped_files) + n_series_skipped_files == report.files_scanned


def test_summary_and_json_never_show_patient_identity(
    dataset: tuple[Path, dict[str, Any]], report: ImportReport, tmp_path: Path
) -> None:
    _, d = dataset
    text = report.summary()
    blob = json.dumps(report.to_json())
    for secret in d["sensitive"]:
        assert secret.lower() not in text.lower(), secret
        assert secret.lower() not in blob.lower(), secret
    for h in report.patients:
        assert h in text
    assert "paired groups: 1" in text and "skipped: 6" in text
    assert "8/500 + 90/4000" in text
    assert "gradient echo" in text and "TE missing" in text and "not DICOM" in text


def test_load_series(dataset: tuple[Path, dict[str, Any]], report: ImportReport) -> None:
    _, d = dataset
    series = _by_uid(report)
    for name in d["eligible"]:
        exp = d["series"][name]
        px, te, tr = load_series(series[exp["series_uid"]])
        assert px.dtype == np.float32 and px.shape == exp["shape"]
        assert (te, tr) == (exp["te"], exp["tr"])
        # exact pixels, in z order: B was written shuffled (RLE), C's Enhanced MR frames reversed
        np.testing.assert_array_equal(px, exp["pixels"])
        assert px.max() > 100  # phantom tissue, not an empty stack


def test_multi_echo_series_is_split(tmp_path: Path) -> None:
    """A dual-echo SE series (one SeriesInstanceUID, two TE) gives two contrasts and a pair."""
    from tests.dicomgen import SeriesSpec, make_series, write_series

    vol = np.full((3, 8, 8), 500.0, np.float32)
    spec = SeriesSpec(te=15.0, tr=3000.0, uid_seed="dual", series_description="PD/T2 SE")
    first = make_series(vol, spec=spec)
    second = make_series(vol * 0.5, spec=SeriesSpec(te=90.0, tr=3000.0, uid_seed="dual", series_description="PD/T2 SE"))
    for i, ds in enumerate(second):  # same series, other echo: new SOP instances
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ds.SOPInstanceUID}.{i + 1}9"
    write_series(first, tmp_path / "e1")
    write_series(second, tmp_path / "e2")
    r = scan(tmp_path)
    assert [s.contrast for s in r.series] == [(15.0, 3000.0), (90.0, 3000.0)]
    assert len({s.series_uid for s in r.series}) == 1
    assert all("multi-echo" in " ".join(s.notes) for s in r.series)
    assert len(r.paired_groups) == 1
    px, te, _ = load_series(r.series[1])
    assert te == 90.0 and px.shape == (3, 8, 8) and float(px.mean()) == pytest.approx(250.0)


@pytest.mark.skipif(HAS_NIBABEL, reason="nibabel is installed: the NIfTI test below covers it")
def test_nifti_without_nibabel_is_skipped_with_reason(tmp_path: Path) -> None:
    hdr = bytearray(352)
    hdr[0:4] = (348).to_bytes(4, "little")
    hdr[344:348] = b"n+1\0"
    (tmp_path / "sub-01").mkdir()
    (tmp_path / "sub-01" / "T2w.nii").write_bytes(bytes(hdr))
    (tmp_path / "sub-01" / "T2w.json").write_text(json.dumps({"EchoTime": 0.09, "RepetitionTime": 4.0}))
    (tmp_path / "sub-01" / "fake.nii").write_text("not nifti")
    r = scan(tmp_path)
    reasons = {Path(w).name: why for w, why in r.skipped}
    assert "nibabel not installed" in reasons["T2w.nii"]
    assert "not a NIfTI" in reasons["fake.nii"]
    assert "T2w.json" not in reasons  # a sidecar is not junk
    assert r.series == []


@pytest.mark.skipif(not HAS_NIBABEL, reason="nibabel not installed (optional, 'train' extra)")
def test_nifti_with_sidecars(tmp_path: Path) -> None:
    import nibabel as nib

    affine = np.diag([1.5, 1.5, 4.0, 1.0])
    rng = np.random.default_rng(0)
    data = {k: rng.uniform(0, 1000, (10, 12, 3)).astype(np.float32) for k in ("T1w", "T2w", "GRE", "ms")}
    anat = tmp_path / "sub-07" / "ses-1" / "anat"
    anat.mkdir(parents=True)
    sidecars = {
        "T1w": {"EchoTime": 0.008, "RepetitionTime": 0.5, "ScanningSequence": "SE", "SequenceVariant": "SP"},
        "T2w": {"EchoTime": 0.09, "RepetitionTime": 4.0},
        "GRE": {"EchoTime": 0.004, "RepetitionTime": 0.3, "ScanningSequence": "GR", "SequenceVariant": "SP"},
        "ms": {"EchoTime": 90, "RepetitionTime": 4.0},
    }
    for k, arr in data.items():
        nib.save(nib.Nifti1Image(arr, affine), anat / f"sub-07_ses-1_{k}.nii.gz")
        (anat / f"sub-07_ses-1_{k}.json").write_text(json.dumps(sidecars[k]))
    other = tmp_path / "study2"
    other.mkdir()
    nib.save(nib.Nifti1Image(data["T1w"], affine), other / "t1.nii")
    (other / "t1.json").write_text(json.dumps({"te_ms": 10, "tr_ms": 550, "PatientID": "SECRET-99"}))
    r = scan(tmp_path)
    got = {(s.patient_hash, s.contrast) for s in r.series}
    assert got == {
        (patient_hash("sub-07"), (8.0, 500.0)),
        (patient_hash("sub-07"), (90.0, 4000.0)),
        (patient_hash("SECRET-99"), (10.0, 550.0)),
    }
    assert all(s.source == "nifti" and (s.n_slices, s.rows, s.cols) == (3, 12, 10) for s in r.series)
    assert len(r.paired_groups) == 1 and r.paired_groups[0].patient_hash == patient_hash("sub-07")
    reasons = {Path(w).name: why for w, why in r.skipped}
    assert "gradient echo" in reasons["sub-07_ses-1_GRE.nii.gz"]
    assert "in seconds" in reasons["sub-07_ses-1_ms.nii.gz"]
    assert "SECRET-99" not in r.summary()
    t2 = next(s for s in r.series if s.te_ms == 90.0)
    px, te, tr = load_series(t2)
    assert px.shape == (3, 12, 10) and (te, tr) == (90.0, 4000.0)
    np.testing.assert_allclose(px, np.transpose(data["T2w"], (2, 1, 0)), rtol=1e-6)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rtcontrast.research.importer", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )


def test_cli(dataset: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    root, d = dataset
    out = tmp_path / "report.json"
    p = _cli("scan", str(root), "--json", str(out))
    assert p.returncode == 0, p.stderr
    assert "paired groups: 1" in p.stdout
    for secret in d["sensitive"]:
        assert secret.lower() not in (p.stdout + p.stderr).lower()
    j = json.loads(out.read_text())
    assert len(j["series"]) == 4 and len(j["paired_groups"]) == 1 and len(j["skipped"]) == 6
    assert all(not Path(path).is_absolute() for s in j["series"] for path in s["paths"])

    p = _cli("scan", str(tmp_path / "does-not-exist"))
    assert p.returncode == 2 and "does not exist" in p.stderr

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    p = _cli("scan", str(junk))
    assert p.returncode == 2
    assert "no usable spin-echo series" in p.stderr
    assert "not DICOM" in p.stdout


def test_include_derived(tmp_path: Path) -> None:
    """A distortion-corrected series (ImageType DERIVED) is skipped with a hint, or taken with
    --include-derived; synthetic images (SyntheticData YES) never are (#16)."""
    from tests.dicomgen import SeriesSpec, make_series, write_series

    vol = np.full((3, 8, 8), 500.0, np.float32)
    corrected = make_series(vol, spec=SeriesSpec(te=90.0, tr=4000.0, uid_seed="dis", series_description="T2 DIS2D"))
    synthetic = make_series(vol, spec=SeriesSpec(te=80.0, tr=4000.0, uid_seed="syn", series_description="SYNTH T2w"))
    for ds in corrected:
        ds.ImageType = ["DERIVED", "PRIMARY", "M", "DIS2D"]
    for ds in synthetic:
        ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
        ds.SyntheticData = "YES"
    write_series(corrected, tmp_path / "dis")
    write_series(synthetic, tmp_path / "syn")

    r = scan(tmp_path)
    assert r.series == []
    reasons = dict(r.skipped).values()
    assert any("DERIVED\\PRIMARY\\M\\DIS2D" in w and "--include-derived" in w for w in reasons), reasons
    assert any("SyntheticData YES" in w for w in reasons), reasons

    r = scan(tmp_path, include_derived=True)
    [s] = r.series
    assert s.series_uid == corrected[0].SeriesInstanceUID and s.te_ms == 90.0
    assert any("included by --include-derived" in n for n in s.notes)
    assert any("SyntheticData YES" in w for _, w in r.skipped)

    assert _cli("scan", str(tmp_path)).returncode == 2
    p = _cli("scan", str(tmp_path), "--include-derived")
    assert p.returncode == 0, p.stderr
