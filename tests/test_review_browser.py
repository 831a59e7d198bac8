"""The review page end to end in a real headless browser (Debian's chromium + chromedriver, selenium).

dcmtk storescu sends two series to a node whose protocol holds every job (QA threshold no
model meets), Orthanc on loopback is the TPS.  A physicist logs in, releases one series
with a note: it arrives at the TPS marked as reviewed (SeriesDescription ``QA-REV``,
ImageComments naming the reviewer and the note).  They discard the other: it never
arrives, its received files and preview are gone, and the audit says who and why.

Bounded everywhere: page loads 20 s, element waits 15 s, jobs 90 s; loopback only.
Skipped only when chromium or chromedriver is not installed (scripts/setup.sh --test
installs both).  ``RTC_REVIEW_SCREENSHOT=docs/review.png`` also saves the page shown in
docs/admin.md.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from rtcontrast.node.review.users import hash_password
from rtcontrast.node.service import Node
from tests.dicomgen import write_series
from tests.orthanc import Orthanc, orthanc  # noqa: F401  (fixture)
from tests.support import phantom_series, storescu, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
HOLD_ALL = {"max_self_nrmse": 1e-4, "max_te_error_frac": 100.0, "max_tr_error_frac": 100.0, "action": "hold"}
REVIEWER, PASSWORD = "Dr Test Physicist", "correct horse battery"

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="chromium / chromedriver not installed (scripts/setup.sh --test installs them)"),
]


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1500", "--no-first-run", "--disable-extensions", "--proxy-server=direct://",
                "--proxy-bypass-list=*"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def _protocol(tps_port: int) -> dict[str, Any]:
    return {
        "version": "review",
        "qa": HOLD_ALL,
        "destinations": {"tps": {"dicom": {"host": "127.0.0.1", "port": tps_port, "ae_title": "ORTHANC",
                                           "connect_timeout_s": 2, "acse_timeout_s": 5}}},
        "recipes": [{"key": "T2w", "label": "T2w", "te_ms": 100, "tr_ms": 4000, "series_number": 901,
                     "destinations": ["tps"]}],
    }


def test_review_release_and_discard_in_a_browser(tmp_path: Path, make_node: Callable[..., Node],
                                                  orthanc: Orthanc, browser: Any,  # noqa: F811
                                                  caplog: pytest.LogCaptureFixture) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    caplog.set_level(logging.INFO)
    users = tmp_path / "reviewers.yaml"
    users.write_text(f"{REVIEWER}: '{hash_password(PASSWORD)}'\n")
    node = make_node(_protocol(orthanc.dicom_port), metrics={"enabled": False},
                     review={"enabled": True, "host": "127.0.0.1", "port": 0, "users_file": str(users)})
    assert node.review is not None and node.review.port
    base = node.review.url.rstrip("/")

    # two series, both held by QA
    keep, drop = phantom_series(uid_seed="rev-keep"), phantom_series(uid_seed="rev-drop")
    for name, src in (("keep", keep), ("drop", drop)):
        assert storescu(node.port, write_series(src, tmp_path / name)).returncode == 0
    wait_for(lambda: len([j for j in node.jobs.recent_jobs() if j.state == "held"]) == 2, 90, "two held jobs")
    by_series = {j.series_uid: j for j in node.jobs.recent_jobs()}
    job_keep, job_drop = by_series[keep[0].SeriesInstanceUID], by_series[drop[0].SeriesInstanceUID]
    drop_spool = node.jobs.job_instances(job_drop.id)[0].path.parent
    assert drop_spool.is_dir() and (tmp_path / "var" / "jobs" / str(job_drop.id) / "preview.png").is_file()

    wait = WebDriverWait(browser, 15)
    # not logged in: the login page; a wrong password is refused
    browser.get(base + "/")
    wait.until(ec.presence_of_element_located((By.ID, "username")))
    browser.find_element(By.ID, "username").send_keys(REVIEWER)
    browser.find_element(By.ID, "password").send_keys("wrong password!")
    browser.find_element(By.ID, "login").click()
    assert "Wrong name or password" in wait.until(ec.presence_of_element_located((By.ID, "error"))).text
    browser.find_element(By.ID, "username").send_keys(REVIEWER)
    browser.find_element(By.ID, "password").send_keys(PASSWORD)
    browser.find_element(By.ID, "login").click()

    # the list: both held, with the QA reason in percent
    held = wait.until(ec.presence_of_element_located((By.ID, "held")))
    assert f"#{job_keep.id}" in held.text and f"#{job_drop.id}" in held.text
    assert "self NRMSE" in held.text and "limit 0.01 %" in held.text
    assert REVIEWER in browser.find_element(By.TAG_NAME, "header").text

    # job detail: verdict, figures, preview image actually loaded, lineage
    browser.find_element(By.ID, f"job-{job_keep.id}").click()
    wait.until(ec.presence_of_element_located((By.ID, "release-form")))
    assert browser.find_element(By.ID, "state").text == "held"
    assert browser.find_element(By.ID, "verdict").text == "failed: held"
    assert "PHANTOM" in browser.find_element(By.ID, "patient").text  # the page may show whose images these are
    img = browser.find_element(By.ID, "preview")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 200
    assert keep[0].SeriesInstanceUID in browser.find_element(By.ID, "lineage").text
    assert "SCANNER at 127.0.0.1" in browser.find_element(By.ID, "lineage").text
    shot = tmp_path / "review.png"
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("RTC_REVIEW_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["RTC_REVIEW_SCREENSHOT"])

    # release with a note
    browser.find_element(By.ID, "release-note").send_keys("anatomy fine, TE off by protocol; checked")
    browser.find_element(By.ID, "release").click()
    assert "Released" in wait.until(ec.presence_of_element_located((By.ID, "done"))).text
    wait_for(lambda: (j := node.jobs.job(job_keep.id)) is not None and j.state == "delivered", 90,
             "released job delivered to the TPS")
    (series,) = orthanc.series()
    ds = pydicom.dcmread(orthanc.save_instance(series["Instances"][0], tmp_path / "got.dcm"))
    assert ds.SeriesDescription.endswith(" QA-REV") and not ds.SeriesDescription.endswith(" QA!")
    assert ds.ImageComments.startswith(f"QA hold released by {REVIEWER} 20")
    assert ": anatomy fine, TE off by protocol; checked. QA: self NRMSE" in ds.ImageComments
    released = [e for e in node.jobs.audit_events(job_keep.id) if e.event == "released"]
    assert released and released[-1].detail is not None
    assert released[-1].detail["user"] == REVIEWER and released[-1].detail["via"] == "review page"

    # discard the other: a note and the confirmation box are both required
    browser.get(f"{base}/jobs/{job_drop.id}")
    wait.until(ec.presence_of_element_located((By.ID, "discard-form")))
    browser.find_element(By.ID, "discard-note").send_keys("motion artefacts, rescan booked")
    browser.find_element(By.ID, "discard-confirm").click()
    browser.find_element(By.ID, "discard").click()
    assert "Discarded" in wait.until(ec.presence_of_element_located((By.ID, "done"))).text
    assert browser.find_element(By.ID, "state").text == "discarded"
    assert "discarded by Dr Test Physicist (review page)" in browser.find_element(By.ID, "decision").text
    assert browser.find_elements(By.ID, "no-preview")
    job = node.jobs.job(job_drop.id)
    assert job is not None and job.state == "failed" and job.reason == f"discarded after QA hold by {REVIEWER}"
    assert not drop_spool.exists() and not (tmp_path / "var" / "jobs" / str(job_drop.id)).exists()
    assert node.wait_idle(30)
    assert len(orthanc.series()) == 1  # the discarded series never arrived
    assert [s for s in orthanc.series() if s["MainDicomTags"].get("SeriesNumber") == "901"]

    # nothing of the patient in the node's logs
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "PHANTOM" not in text and "RTC-PHANTOM" not in text

    # the page stops with the node
    port = node.review.port
    node.stop(timeout_s=10)
    assert node.review is None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
