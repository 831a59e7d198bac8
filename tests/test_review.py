"""Issue #16 (part A) without a browser: QA reasons in percent, the reviewer's decision in the DICOM,
the hold lifecycle (CLI discard and release, retention of holds), the review settings, and the
review page's guards over real HTTP(S) on loopback (login, lockout, CSRF, cross-site posts,
headers, TLS).

A real SQLite job store and real files throughout; the HTTP tests talk to the real server
(uvicorn in its thread), no test client.
"""

from __future__ import annotations

import http.client
import http.cookiejar
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.dataset import Dataset

import node as node_cli
from rtcontrast.node.ops.holds import check_note, check_reviewer
from rtcontrast.node.ops.retention import purge
from rtcontrast.node.qa import (
    ReviewDecision,
    flag_datasets,
    qa_violations,
    review_decision,
)
from rtcontrast.node.receive.scp import StoredInstance
from rtcontrast.node.review.server import ReviewServer
from rtcontrast.node.review.users import hash_password, load_users, verify_password
from rtcontrast.node.store import db
from rtcontrast.node.store.jobs import JobStore
from rtcontrast.settings.node import ConfigError, NodeConfig, load_node_config
from rtcontrast.settings.protocol import ProtocolConfig
from tests.tlsgen import make_pki

PASSWORD = "a long enough password"


# ----------------------------------------------------------------------------- QA texts and DICOM flag


def _protocol(**qa: Any) -> ProtocolConfig:
    return ProtocolConfig.model_validate({"version": "t", "qa": qa, "destinations": {"out": {"folder": {"path": "x"}}},
                                          "recipes": [{"key": "A", "label": "A", "te_ms": 80, "tr_ms": 3000,
                                                       "series_number": 901, "destinations": ["out"]}]})


def test_violations_read_in_percent_with_units() -> None:
    qa = {"self_nrmse": 0.0052, "te_header_ms": 75.0, "te_pred_ms": 760.0, "te_error_frac": 9.1333,
          "tr_header_ms": 4500.0, "tr_pred_ms": 900.4, "tr_error_frac": 0.8}
    got = qa_violations(qa, _protocol(max_self_nrmse=0.004, max_te_error_frac=0.6, max_tr_error_frac=0.5))
    assert got == [
        "self NRMSE 0.52 % (the maps re-render the input this far off); limit 0.4 %",
        "TE identified 913 % off (header 75 ms, image says 760 ms); limit 60 %",
        "TR identified 80 % off (header 4500 ms, image says 900 ms); limit 50 %",
    ]
    assert qa_violations(qa, _protocol(max_self_nrmse=0.01, max_te_error_frac=10, max_tr_error_frac=1)) == []


def test_flag_says_whether_a_reviewer_released_it() -> None:
    warned, reviewed = Dataset(), Dataset()
    warned.SeriesDescription = reviewed.SeriesDescription = "SYNTH T2w TE100 TR4000"
    flag_datasets([warned], "self NRMSE 2 %")
    assert warned.SeriesDescription == "SYNTH T2w TE100 TR4000 QA!"
    assert warned.ImageComments == "QA WARNING: self NRMSE 2 %"
    decision = ReviewDecision(user="Dr A", at="2026-11-30T12:34:56.123456+00:00", note="fine for planning")
    flag_datasets([reviewed], "self NRMSE 2 %", review=decision)
    assert reviewed.SeriesDescription == "SYNTH T2w TE100 TR4000 QA-REV"
    assert reviewed.ImageComments == ("QA hold released by Dr A 2026-11-30 12:34 UTC: fine for planning. "
                                      "QA: self NRMSE 2 %")
    flag_datasets([reviewed], "x", review=decision)  # flagged twice: one suffix
    assert reviewed.SeriesDescription.count("QA") == 1
    long = Dataset()
    long.SeriesDescription = "S" * 64
    flag_datasets([long], "x", review=decision)
    assert len(long.SeriesDescription) == 64 and long.SeriesDescription.endswith(" QA-REV")


def test_reviewer_and_note_rules() -> None:
    assert check_reviewer("  Dr  A. O'Neil ") == "Dr A. O'Neil"
    for bad in ("", "   ", "x\\y", "a" * 65, "<script>"):
        with pytest.raises(ValueError):
            check_reviewer(bad)
    assert check_note("two\nlines") == "two lines"
    with pytest.raises(ValueError, match="note is required"):
        check_note("  ")
    with pytest.raises(ValueError, match="at most 500"):
        check_note("x" * 501)
    assert check_note(None, required=False) is None


# ----------------------------------------------------------------------------- settings


def test_review_settings_refuse_an_open_page_beyond_loopback(tmp_path: Path) -> None:
    for host in ("127.0.0.1", "::1", "localhost"):
        NodeConfig.model_validate({"review": {"enabled": True, "host": host}})
    p = tmp_path / "node.yaml"
    p.write_text("review:\n  enabled: true\n  host: 0.0.0.0\n")
    with pytest.raises(ConfigError) as err:
        load_node_config(p)
    assert any(e.startswith(f"{p}:1: review: ") and "needs cert_file, key_file (HTTPS) and users_file" in e
               for e in err.value.errors), err.value.errors
    pki = make_pki(tmp_path / "pki")
    users = tmp_path / "users.yaml"
    users.write_text("")
    with pytest.raises(ValueError, match="cert_file and key_file go together"):
        NodeConfig.model_validate({"review": {"cert_file": str(pki.server.cert)}})
    ok = NodeConfig.model_validate({"review": {"enabled": True, "host": "0.0.0.0", "cert_file": str(pki.server.cert),
                                               "key_file": str(pki.server.key), "users_file": str(users)}})
    assert ok.review.tls
    assert NodeConfig().held_retention_days == 30


def test_users_file_and_password_hashes(tmp_path: Path) -> None:
    from rtcontrast.node.review.users import main

    f = tmp_path / "reviewers.yaml"
    import io
    import sys

    old = sys.stdin
    try:
        sys.stdin = io.StringIO(PASSWORD + "\n")
        assert main(["--file", str(f), "--password-stdin", "add", "Dr A"]) == 0
        sys.stdin = io.StringIO("short\n")
        assert main(["--file", str(f), "--password-stdin", "add", "Dr B"]) == 1  # too short
    finally:
        sys.stdin = old
    users = load_users(f)
    assert list(users) == ["Dr A"] and PASSWORD not in f.read_text()
    assert verify_password(users, "Dr A", PASSWORD) and not verify_password(users, "Dr A", "wrong")
    assert not verify_password(users, "Nobody", PASSWORD) and not verify_password(users, "Dr A", "x" * 100)
    assert main(["--file", str(f), "remove", "Dr A"]) == 0 and load_users(f) == {}
    f.write_text("Dr C: plaintext\n")
    with pytest.raises(ValueError, match="not a bcrypt hash"):
        load_users(f)


# ----------------------------------------------------------------------------- hold lifecycle


def _record(jobs: JobStore, spool: Path, study: str, series: str, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        sop = f"{series}.{i + 1}"
        p = spool / study / series / f"{sop}.dcm"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * 100)
        jobs.record_instance(StoredInstance(p, study, series, sop, "1.2.840.10008.5.1.4.1.1.4", "SCANNER",
                                            "127.0.0.1", datetime.now(UTC)))
        paths.append(p)
    return paths


def _held_job(jobs: JobStore, var: Path, series: str, n: int = 3) -> tuple[int, list[Path]]:
    paths = _record(jobs, var / "spool", "1.2.3", series, n)
    job_id = jobs.create_job("1.2.3", series)
    assert job_id is not None
    jobs.audit(job_id, "held", {"reason": "QA hold: self NRMSE 2 %"})
    jobs.set_state(job_id, "held", "QA hold: self NRMSE 2 % (...); limit 1 %",
                   qa={"self_nrmse": 0.02, "violations": ["self NRMSE 2 % (...); limit 1 %"], "action": "hold"})
    preview = var / "jobs" / str(job_id) / "preview.png"
    preview.parent.mkdir(parents=True, exist_ok=True)
    preview.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 100)
    return job_id, paths


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[JobStore, Path, str]]:
    var = tmp_path / "var"
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"var_dir": str(var)}))
    conn = db.connect(var / "rtcontrast.db")
    yield JobStore(conn), var, str(cfg)
    conn.close()


def test_discard_from_the_cli_removes_files_and_audits(store: tuple[JobStore, Path, str],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    jobs, var, cfg = store
    job_id, paths = _held_job(jobs, var, "1.2.3.4")
    with pytest.raises(SystemExit) as exit_:
        node_cli.main(["discard", "--config", cfg, "--job", str(job_id)])  # --note is required
    assert exit_.value.code == 2
    assert node_cli.main(["discard", "--config", cfg, "--job", "999", "--note", "x"]) == 1
    assert node_cli.main(["discard", "--config", cfg, "--job", str(job_id), "--note", "  "]) == 1
    assert "note is required" in capsys.readouterr().err
    assert all(p.is_file() for p in paths)

    assert node_cli.main(["discard", "--config", cfg, "--job", str(job_id), "--note", "motion", "--user", "Dr A"]) == 0
    assert "discarded: never sent; 4 file(s)" in capsys.readouterr().out
    assert not any(p.exists() for p in paths) and not paths[0].parent.exists()
    assert not (var / "jobs" / str(job_id)).exists()
    job = jobs.job(job_id)
    assert job is not None and job.state == "failed" and job.reason == "discarded after QA hold by Dr A"
    events = {e.event: e.detail for e in jobs.audit_events(job_id)}
    assert events["discarded"] == {"user": "Dr A", "note": "motion", "via": "cli",
                                   "previous_reason": "QA hold: self NRMSE 2 % (...); limit 1 %"}
    assert events["files_removed"] == {"spool_files": 3, "job_folder_files": 1, "bytes": 408}
    assert node_cli.main(["discard", "--config", cfg, "--job", str(job_id), "--note", "again"]) == 1
    assert "is failed, not held" in capsys.readouterr().err


def test_discard_keeps_files_another_pending_job_needs(store: tuple[JobStore, Path, str]) -> None:
    jobs, var, cfg = store
    job_id, paths = _held_job(jobs, var, "1.2.3.5")
    # one instance re-sent: a newer job claims the whole series and is still running
    _record(jobs, var / "spool", "1.2.3", "1.2.3.5", 1)
    newer = jobs.create_job("1.2.3", "1.2.3.5")
    assert newer is not None
    jobs.set_state(newer, "rendering")
    assert node_cli.main(["discard", "--config", cfg, "--job", str(job_id), "--note", "old", "--user", "Dr A"]) == 0
    assert all(p.is_file() for p in paths)  # the running job reads them
    assert not (var / "jobs" / str(job_id)).exists()


def test_release_from_the_cli_records_the_reviewer(store: tuple[JobStore, Path, str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    jobs, var, cfg = store
    job_id, _ = _held_job(jobs, var, "1.2.3.6")
    monkeypatch.setenv("SUDO_USER", "physicist1")
    assert node_cli.main(["release", "--config", cfg, "--job", str(job_id), "--note", "ok"]) == 0
    job = jobs.job(job_id)
    assert job is not None and job.state == "received"
    decision = review_decision(jobs, job_id)
    assert decision is not None and decision.user == "physicist1" and decision.note == "ok"
    assert decision.comment().startswith("QA hold released by physicist1 20") and decision.comment().endswith(": ok")


def test_retention_discards_holds_nobody_reviewed(store: tuple[JobStore, Path, str]) -> None:
    jobs, var, _ = store
    job_id, paths = _held_job(jobs, var, "1.2.3.7")
    kw: dict[str, Any] = {"spool_root": var / "spool", "outbox_root": var / "outbox", "jobs_root": var / "jobs",
                          "export_dirs": {}, "retention_days": 30}
    db_file = var / "rtcontrast.db"
    soon = purge(db_file, held_retention_days=30, now=time.time() + 10 * 86400, **kw)
    assert soon.held_discarded == [] and "discarded none" in soon.render()
    assert purge(db_file, held_retention_days=None, now=time.time() + 40 * 86400, **kw).held_discarded == []
    dry = purge(db_file, held_retention_days=30, now=time.time() + 31 * 86400, dry_run=True, **kw)
    assert dry.held_discarded == [job_id] and f"would discard #{job_id}" in dry.render()
    assert all(p.is_file() for p in paths) and jobs.job(job_id).state == "held"  # type: ignore[union-attr]
    done = purge(db_file, held_retention_days=30, now=time.time() + 31 * 86400, **kw)
    assert done.held_discarded == [job_id] and f"discarded #{job_id}" in done.render()
    assert not any(p.exists() for p in paths) and not (var / "jobs" / str(job_id)).exists()
    (ev,) = [e for e in jobs.audit_events(job_id) if e.event == "discarded"]
    assert ev.detail is not None and ev.detail["user"] == "retention" and ev.detail["via"] == "retention"
    assert "unreviewed for more than 30 day(s)" in ev.detail["note"]


# ----------------------------------------------------------------------------- HTTP guards


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Client:
    """A cookie-keeping HTTP(S) client that does not follow redirects (status codes are the point)."""

    def __init__(self, base: str, context: ssl.SSLContext | None = None) -> None:
        self.base = base.rstrip("/")
        self.jar = http.cookiejar.CookieJar()
        handlers: list[Any] = [urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect()]
        if context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self.opener = urllib.request.build_opener(*handlers)

    def request(self, path: str, form: dict[str, str] | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        req = urllib.request.Request(self.base + path, data=data, headers=headers or {})
        try:
            with self.opener.open(req, timeout=10) as r:
                return r.status, dict(r.headers), r.read().decode("latin-1")
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read().decode("latin-1")

    def csrf(self, path: str) -> str:
        status, _, html = self.request(path)
        assert status == 200, (status, html[:200])
        m = re.search(r'name="csrf" value="([^"]+)"', html)
        assert m is not None
        return m.group(1)


@pytest.fixture
def review(tmp_path: Path, store: tuple[JobStore, Path, str]) -> Iterator[Any]:
    """Start a review server on loopback for a config; stopped at the end."""
    servers: list[ReviewServer] = []

    def start(**review_settings: Any) -> ReviewServer:
        cfg = NodeConfig.model_validate({"var_dir": str(store[1]),
                                         "review": {"enabled": True, "port": 0, **review_settings}})
        s = ReviewServer(cfg)
        s.start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def test_logins_lockout_csrf_and_cross_site_posts(tmp_path: Path, store: tuple[JobStore, Path, str],
                                                  review: Any) -> None:
    jobs, var, _ = store
    job_id, _ = _held_job(jobs, var, "1.2.3.8")
    users = tmp_path / "users.yaml"
    users.write_text(f"Dr A: '{hash_password(PASSWORD)}'\n")
    server = review(users_file=str(users))
    c = Client(server.url)

    status, headers, _ = c.request("/")
    assert status == 303 and headers["location"] == "/login"
    assert c.request(f"/jobs/{job_id}")[0] == 303 and c.request(f"/jobs/{job_id}/preview.png")[0] == 303
    status, headers, _ = c.request("/login")
    assert status == 200 and "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY" and headers["cache-control"] == "no-store"
    assert "samesite=strict" in headers["set-cookie"].lower() and "httponly" in headers["set-cookie"].lower()

    # a login form without the token is refused before the password is looked at
    assert c.request("/login", {"username": "Dr A", "password": PASSWORD})[0] == 403
    token = c.csrf("/login")
    assert c.request("/login", {"csrf": token, "username": "Dr A", "password": PASSWORD},
                     {"Origin": "http://evil.example"})[0] == 403
    assert c.request("/login", {"csrf": token, "username": "Dr A", "password": "nope"})[0] == 401
    status, headers, _ = c.request("/login", {"csrf": token, "username": "Dr A", "password": PASSWORD})
    assert status == 303 and headers["location"] == "/"
    token = c.csrf(f"/jobs/{job_id}")  # a new session at login: a new token
    assert c.request(f"/jobs/{job_id}/preview.png")[0] == 200

    # decisions: token, same origin, note all required; the job stays held until all hold
    form = {"csrf": token, "note": "fine"}
    assert c.request(f"/jobs/{job_id}/release", {"note": "fine"})[0] == 403
    assert c.request(f"/jobs/{job_id}/release", {**form, "csrf": "x" * 43})[0] == 403
    assert c.request(f"/jobs/{job_id}/release", form, {"Sec-Fetch-Site": "cross-site"})[0] == 403
    assert c.request(f"/jobs/{job_id}/release", form, {"Origin": "null"})[0] == 403
    status, _, html = c.request(f"/jobs/{job_id}/release", {**form, "note": ""})
    assert status == 400 and "note is required" in html
    status, _, html = c.request(f"/jobs/{job_id}/discard", {**form})
    assert status == 400 and "confirm" in html
    assert c.request(f"/jobs/{job_id}/bogus", form)[0] == 404
    assert jobs.job(job_id).state == "held"  # type: ignore[union-attr]
    status, headers, _ = c.request(f"/jobs/{job_id}/release", form, {"Origin": server.url.rstrip("/")})
    assert status == 303 and headers["location"] == f"/jobs/{job_id}?done=released"
    (ev,) = [e for e in jobs.audit_events(job_id) if e.event == "released"]
    assert ev.detail == {"user": "Dr A", "note": "fine", "via": "review page",
                         "previous_reason": "QA hold: self NRMSE 2 % (...); limit 1 %"}
    status, _, html = c.request(f"/jobs/{job_id}/discard", {**form, "confirm": "yes"})
    assert status == 409 and "not held" in html
    assert c.request("/jobs/4242")[0] == 404

    # logging out ends the login on the server: a copy of the old cookie opens nothing
    (cookie,) = [ck for ck in c.jar if ck.name == "rtcontrast_review"]
    token = c.csrf("/")
    assert c.request("/logout", {"csrf": token})[0] == 303
    assert c.request("/")[0] == 303
    assert Client(server.url).request("/", headers={"Cookie": f"{cookie.name}={cookie.value}"})[0] == 303

    # a reviewer removed from the users file cannot decide any more, even while logged in
    job2, _ = _held_job(jobs, var, "1.2.3.10")
    token = c.csrf("/login")
    assert c.request("/login", {"csrf": token, "username": "Dr A", "password": PASSWORD})[0] == 303
    token = c.csrf(f"/jobs/{job2}")
    users.write_text("")
    status, headers, _ = c.request(f"/jobs/{job2}/release", {"csrf": token, "note": "x"})
    assert status == 303 and headers["location"] == "/login"
    assert jobs.job(job2).state == "held"  # type: ignore[union-attr]
    assert c.request("/")[0] == 303

    # a fresh client: five wrong passwords lock its address out, even for the right one
    users.write_text(f"Dr A: '{hash_password(PASSWORD)}'\n")
    other = Client(server.url)
    token = other.csrf("/login")
    for _ in range(5):
        assert other.request("/login", {"csrf": token, "username": "Dr A", "password": "wrong"})[0] == 401
    assert other.request("/login", {"csrf": token, "username": "Dr A", "password": PASSWORD})[0] == 429


def test_loopback_without_logins_asks_for_the_name(store: tuple[JobStore, Path, str], review: Any) -> None:
    jobs, var, _ = store
    job_id, paths = _held_job(jobs, var, "1.2.3.9")
    server = review()
    c = Client(server.url)
    status, _, html = c.request("/")
    assert status == 200 and f"#{job_id}" in html and "no logins (loopback only)" in html
    token = c.csrf(f"/jobs/{job_id}")
    status, _, html = c.request(f"/jobs/{job_id}/discard", {"csrf": token, "note": "bad", "confirm": "yes"})
    assert status == 400 and "name is required" in html
    status, _, _ = c.request(f"/jobs/{job_id}/discard",
                             {"csrf": token, "note": "bad", "confirm": "yes", "reviewer": "Dr B"})
    assert status == 303 and not any(p.exists() for p in paths)
    status, _, html = c.request(f"/jobs/{job_id}")
    assert "discarded by Dr B (review page)" in html and "No preview" in html


def test_https_page_with_tls12_and_secure_cookies(tmp_path: Path, review: Any) -> None:
    pki = make_pki(tmp_path / "pki")
    users = tmp_path / "users.yaml"
    users.write_text("")
    server = review(cert_file=str(pki.server.cert), key_file=str(pki.server.key), users_file=str(users))
    assert server.url.startswith("https://127.0.0.1:")
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    status, headers, html = Client(server.url, ctx).request("/login")
    assert status == 200 and "Log in" in html
    assert "secure" in headers["set-cookie"].lower() and headers["strict-transport-security"].startswith("max-age=")
    assert server._server is not None and server._server.config.ssl is not None
    assert server._server.config.ssl.minimum_version == ssl.TLSVersion.TLSv1_2  # BCP 195, like DICOM TLS
    tls12 = ssl.create_default_context(cafile=str(pki.ca))
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    assert Client(server.url, tls12).request("/login")[0] == 200
    untrusted = ssl.create_default_context()  # the system CAs do not know the test CA
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        Client(server.url, untrusted).request("/login")
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        Client(server.url.replace("https://", "http://")).request("/login")


def test_a_taken_review_port_does_not_stop_the_node(make_node: Any, caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with caplog.at_level(logging.ERROR, logger="rtcontrast.node.service"):
            node = make_node(_protocol().model_dump(mode="json"), metrics={"enabled": False},
                             review={"enabled": True, "port": port})
        assert node.review is None and node.healthy()
        assert any(f"review page 127.0.0.1:{port} not served" in r.getMessage() for r in caplog.records)
