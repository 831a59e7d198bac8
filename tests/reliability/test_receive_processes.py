"""Receiver processes (``receive_processes`` > 1): they take instances, the node hears of them, none outlives it.

Why: with several processes accepting from one socket, an instance may be acknowledged by
a process that is not the one running jobs.  What must hold: such an instance is durable
(spool + database) before Success, the main process learns of it and makes the series a
job, a receiver that dies is restarted, and none survives the node (a receiver left
listening after a crash would take a scanner's instances into a node that is not there).

Deterministic: the main process is stopped (SIGSTOP) while a scanner sends, so only the
receivers can accept; the main process is continued afterwards and must catch up.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.reliability.helpers import (
    NodeProcess,
    db_rows,
    echo,
    node_settings,
    send,
    series,
    tps_protocol,
    wait_for,
    write_configs,
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0): look at its state
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _receiver_pids(node: NodeProcess) -> list[int]:
    pattern = r"receiver process\(es\) accept beside the main process \(receive_processes \d+; pids ([\d, ]+)\)"
    m = wait_for(lambda: re.findall(pattern, node.text()), 60, "the receiver processes to listen")
    return [int(p) for p in m[-1].split(", ")]


def _children(pid: int) -> list[int]:
    """Child pids of every thread of ``pid``; a thread that exits while being listed has none left to report."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return out


@pytest.fixture()
def node3(tmp_path: Path) -> tuple[NodeProcess, dict]:
    settings = node_settings(tmp_path / "var", receive_processes=3, series_idle_timeout_s=60.0,
                             release_grace_s=0.3)
    # no destination reachable: this test is about receiving; jobs run and their sends wait
    node = NodeProcess(write_configs(tmp_path, settings, tps_protocol(1, 1)), tmp_path / "node.log")
    try:
        node.wait_listening()
        yield node, settings
    finally:
        node.kill()


def test_receivers_take_instances_while_the_main_process_is_stopped(node3: tuple[NodeProcess, dict]) -> None:
    node, settings = node3
    db = Path(settings["var_dir"]) / "rtcontrast.db"
    pids = _receiver_pids(node)
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    sr = series("recv-proc-a", n=8)
    os.kill(node.pid, signal.SIGSTOP)
    try:
        result = send(settings["port"], sr, ae_title="SCANNER1")
        # acknowledged by a receiver: in the database before Success, though the main process is stopped
        rows = db_rows(db, "SELECT COUNT(*) FROM instances WHERE series_uid=?", (str(sr[0].SeriesInstanceUID),))
    finally:
        os.kill(node.pid, signal.SIGCONT)
    assert result.associated and len(result.succeeded) == 8, result
    assert rows == [(8,)]
    # the main process hears of the release and makes the series a job well before the 60 s idle timeout
    wait_for(lambda: db_rows(db, "SELECT COUNT(*) FROM jobs WHERE series_uid=?", (str(sr[0].SeriesInstanceUID),))
             == [(1,)], 30, "the series to become a job")
    assert re.search(r"\[receiver-\d/[^\]]*\] association released from", node.text()), node.text()[-3000:]


def test_a_dead_receiver_is_restarted_and_none_outlives_the_node(node3: tuple[NodeProcess, dict]) -> None:
    node, settings = node3
    pids = _receiver_pids(node)
    os.kill(pids[0], signal.SIGKILL)
    wait_for(lambda: re.search(r"receiver process \d \(pid %d\) exited with code -9" % pids[0], node.text()),
             10, "the node to notice the dead receiver")
    wait_for(lambda: "restart 1" in node.text() and node.text().count("storage SCP RTCONTRAST listening") >= 4,
             60, "the receiver to be restarted")
    time.sleep(3.0)  # the restarted receiver stays up (it was once killed with the thread that started it)
    assert "restart 2" not in node.text(), node.text()[-3000:]
    assert echo(settings["port"]) == 0
    sr = series("recv-proc-b", n=4)
    assert len(send(settings["port"], sr).succeeded) == 4
    children = _children(node.pid)
    assert len(children) >= 2, children
    node.kill()  # a crash of the main process: the receivers must go with it
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in children), "a receiver process outlived the node"
    assert echo(settings["port"]) is None  # nobody listens any more
