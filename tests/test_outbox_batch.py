"""Outbox.enqueue of a slab (#13): files written and fsync'd together, the same files and rows; a failure queues nothing."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pydicom
import pytest

from rtcontrast.node.dispatch import outbox as outbox_mod
from rtcontrast.node.dispatch.outbox import Outbox
from rtcontrast.node.store import db
from tests.support import phantom_series


def test_a_slab_is_written_whole_and_recorded(tmp_path: Path) -> None:
    ob = Outbox(db.connect(tmp_path / "n.db"), tmp_path / "outbox")
    dss = phantom_series(n=6, size=32)
    ids = ob.enqueue(7, "tps", dss)
    items = ob.items(job_id=7)
    assert len(ids) == 6 and [it.sop_instance_uid for it in items] == [str(d.SOPInstanceUID) for d in dss]
    for it, ds in zip(items, dss):
        back = pydicom.dcmread(it.path)
        assert back.SOPInstanceUID == ds.SOPInstanceUID and back.PixelData == ds.PixelData
    assert not [p for p in (tmp_path / "outbox").rglob(".*.tmp")]
    assert ob.enqueue(7, "tps", dss) and len(ob.items(job_id=7)) == 6  # re-enqueue replaces


def test_a_failing_write_in_a_slab_queues_no_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ob = Outbox(db.connect(tmp_path / "n.db"), tmp_path / "outbox")
    real = outbox_mod._atomic_write
    calls = {"n": 0}

    def write(dest: Path, fn: Any, sync_dir: bool = True) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(dest))
        real(dest, fn, sync_dir)

    monkeypatch.setattr(outbox_mod, "_atomic_write", write)
    with pytest.raises(OSError):
        ob.enqueue(8, "tps", phantom_series(n=6, size=32))
    assert ob.items(job_id=8) == []
    assert not [p for p in (tmp_path / "outbox").rglob(".*.tmp")]
