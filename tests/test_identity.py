"""One SOP Instance UID in two series (#15 finding 5): refused, never silently replacing the first.

Before: instances were keyed by SOP Instance UID alone, so the second series' instance
replaced the first series' row: 4 acknowledged, 3 delivered.  Now the second one gets
0x0111 (Duplicate SOP Instance) from a real SCP + job store, the first series keeps its
instance, and the refused bytes are quarantined (nothing received is lost).
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from rtcontrast.node.receive.scp import ScpSettings, StorageSCP
from rtcontrast.node.receive.spool import Spool
from rtcontrast.node.store import db
from rtcontrast.node.store.jobs import JobStore
from tests.conftest import dcmtk, free_port
from tests.dicomgen import write_series
from tests.support import phantom_series

pytestmark = pytest.mark.network


def test_sop_uid_reused_in_another_series_is_refused(tmp_path: Path) -> None:
    jobs = JobStore(db.connect(tmp_path / "node.db"))
    spool = Spool(tmp_path / "spool")
    scp = StorageSCP(ScpSettings(host="127.0.0.1", port=free_port(), require_called_aet=False), spool,
                     jobs.record_instance, lambda keys: None)
    first = phantom_series(n=2, size=16)
    second = [copy.deepcopy(ds) for ds in first]
    series_b = generate_uid()
    for ds in second:
        ds.SeriesInstanceUID = series_b
    second[1].SOPInstanceUID = generate_uid()  # second[0] keeps first[0]'s SOP Instance UID
    second[1].file_meta.MediaStorageSOPInstanceUID = second[1].SOPInstanceUID
    second[0].file_meta.MediaStorageSOPInstanceUID = second[0].SOPInstanceUID
    a = write_series(first, tmp_path / "a")
    b = write_series(second, tmp_path / "b")
    scp.start()
    try:
        ra = subprocess.run([dcmtk("storescu"), "-v", "-nh", "127.0.0.1", str(scp.port), *map(str, a)],
                            capture_output=True, text=True, timeout=60)
        rb = subprocess.run([dcmtk("storescu"), "-v", "-nh", "127.0.0.1", str(scp.port), *map(str, b)],
                            capture_output=True, text=True, timeout=60)
    finally:
        scp.stop()
    assert ra.returncode == 0, ra.stderr
    assert "Received Store Response (Unknown Status: 0x111)" in rb.stderr, rb.stderr  # dcmtk has no name for it
    rec = jobs.instance(str(first[0].SOPInstanceUID))
    assert rec is not None and rec.series_uid == str(first[0].SeriesInstanceUID) and rec.path.is_file()
    job_a = jobs.create_job(str(first[0].StudyInstanceUID), str(first[0].SeriesInstanceUID))
    job_b = jobs.create_job(str(first[0].StudyInstanceUID), series_b)
    assert job_a is not None and job_b is not None
    assert len(jobs.job_instances(job_a)) == 2 and len(jobs.job_instances(job_b)) == 1
    assert [p.suffix for p in sorted((tmp_path / "spool" / "quarantine").iterdir())] == [".dcm", ".reason"]
    assert any(e.event == "instance_refused_duplicate_uid" for e in jobs.audit_events(series_uid=series_b))
