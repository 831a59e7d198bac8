"""A huge series cannot starve the others (#15 finding 10: 1000 slices of 16x16 held the one worker 244 s).

A real node, dcmtk storescu as the scanner, a folder destination: a 300-slice series is
sent, then at once a 3-slice one; the small one must be finished while the big one still
runs (the small-series lane; with one worker it waited for the big one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rtcontrast.node.store.jobs import JobState
from rtcontrast.node.workqueue import WorkQueues
from tests.dicomgen import write_series
from tests.support import LENIENT_QA, phantom_series, storescu, wait_for

pytestmark = pytest.mark.network
DONE = (JobState.QUEUED, JobState.DELIVERED)


def test_queue_order_and_lanes() -> None:
    q = WorkQueues(small_max=10)
    q.put(1, 500)
    q.put(2, 400)
    q.put(3, 5)
    q.put(4, 8, lane_allowed=False)  # e.g. fusion on: main worker only
    assert q.get("small") == 3
    assert [q.get("main"), q.get("main"), q.get("main")] == [4, 2, 1]  # smallest first
    for _ in range(4):
        q.done()
    assert q.idle()


def _run(make_node: Any, tmp_path: Path, lane: int) -> tuple[Any, Any, Any]:
    protocol = {"destinations": {"out": {"folder": {"path": str(tmp_path / f"export{lane}")}}},
                "recipes": [{"key": "T2w", "label": "T2w", "te_ms": 100, "tr_ms": 4000, "series_number": 901,
                             "destinations": ["out"]}], "qa": LENIENT_QA}
    # a release grace of 4 s: both series are received before the big one's job starts
    node = make_node(protocol, small_series_max_instances=lane, var_dir=str(tmp_path / f"var{lane}"),
                     release_grace_s=4.0, series_idle_timeout_s=8.0)
    big = phantom_series(n=300, size=16, uid_seed=f"fair-big-{lane}")
    small = phantom_series(n=3, size=16, uid_seed=f"fair-small-{lane}")
    assert storescu(node.port, write_series(big, tmp_path / f"big{lane}")).returncode == 0
    assert storescu(node.port, write_series(small, tmp_path / f"small{lane}")).returncode == 0
    key = (str(small[0].StudyInstanceUID), str(small[0].SeriesInstanceUID))
    small_job = wait_for(lambda: (j := node.jobs.jobs_for_series(*key)) and j[-1].state in DONE and j[-1], 300,
                         "the small series")
    big_job = node.jobs.jobs_for_series(str(big[0].StudyInstanceUID), str(big[0].SeriesInstanceUID))[-1]
    return small_job, big_job, node


@pytest.mark.slow  # ~50 s on two busy cores: a big series has to take long for the overlap
def test_small_series_not_starved_by_a_huge_one(make_node: Any, tmp_path: Path) -> None:
    small_job, big_job, _ = _run(make_node, tmp_path, lane=64)
    assert big_job.id != small_job.id
    assert big_job.state not in DONE, "the big series finished first: the small one waited for it"
    assert small_job.state in DONE
