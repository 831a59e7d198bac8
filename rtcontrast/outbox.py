"""Durable outbox: every derived instance reaches each destination, or an admin sees why not.

Why this shape: a TPS is sometimes down, slow, or rejects an object, and the node may be
restarted at any moment.  So delivery is split in two:

* :class:`Outbox` owns the state.  :meth:`Outbox.enqueue` writes each instance to
  ``<root>/<destination>/<job>/<SOPInstanceUID>.dcm`` (temp file, fsync, rename) and then
  records one row per (destination, job, SOP instance) in SQLite, all rows in one
  transaction.  Nothing is "sent" until a row says ``delivered``.
* :class:`Sender` moves rows forward.  :meth:`Sender.run_once` sends everything that is
  due, one association per destination, checks EVERY C-STORE status, and updates each
  row: ``delivered`` (success, or one of the warning statuses 0xB000/0xB006/0xB007), or a
  failed attempt with exponential backoff (with jitter, capped); after
  ``max_attempts`` failures the row goes to ``dead_letter``, listed by
  :meth:`Outbox.dead_letters` and put back by :meth:`Outbox.retry_dead`.

Restart: a new Outbox + Sender on the same database and directory carries on with every
``pending`` row.  An instance that was on the wire when the node died is sent again; the
TPS replaces it by SOP Instance UID, so a re-send never duplicates.  Delivered rows are
kept for the audit (when, which status); their files may be deleted.

States: ``pending`` -> ``delivered`` | ``dead_letter``; ``dead_letter`` -> ``pending``
(retry_dead); any row -> ``pending`` when the same instance is enqueued again.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Union

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    PYDICOM_IMPLEMENTATION_UID,
)
from pynetdicom import AE, evt

from rtcontrast.db import register_schema, transaction

log = logging.getLogger(__name__)

PENDING = "pending"
DELIVERED = "delivered"
DEAD_LETTER = "dead_letter"
STATES: tuple[str, ...] = (PENDING, DELIVERED, DEAD_LETTER)

#: C-STORE warning statuses (PS3.4 B.2.3): the peer stored the instance, possibly altered.
WARNING_STATUSES: dict[int, str] = {
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}
#: A presentation context may list at most this many contexts per association (PS3.8).
MAX_CONTEXTS = 128
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox_items (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id              TEXT NOT NULL,
    destination         TEXT NOT NULL,
    sop_instance_uid    TEXT NOT NULL,
    sop_class_uid       TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    study_instance_uid  TEXT NOT NULL DEFAULT '',
    series_instance_uid TEXT NOT NULL DEFAULT '',
    path                TEXT NOT NULL,
    state               TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'dead_letter')),
    attempts            INTEGER NOT NULL DEFAULT 0,
    generation          INTEGER NOT NULL DEFAULT 0,
    next_attempt_at     REAL NOT NULL,
    created_at          REAL NOT NULL,
    updated_at          REAL NOT NULL,
    delivered_at        REAL,
    last_status         INTEGER,
    last_error          TEXT,
    UNIQUE (destination, job_id, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS outbox_items_due ON outbox_items (state, destination, next_attempt_at);
CREATE INDEX IF NOT EXISTS outbox_items_job ON outbox_items (job_id, state);
"""
register_schema("outbox", _SCHEMA)


# -- destinations ------------------------------------------------------------------
@dataclass(frozen=True)
class DicomDestination:
    """A C-STORE SCP (the TPS, a PACS).

    TLS fields are optional; when ``tls`` is true the association runs over TLS 1.2+: the
    peer's certificate must chain to ``tls_ca_file`` (the system CAs when None) and name
    ``tls_server_hostname`` (default ``host``); ``tls_cert_file``/``tls_key_file`` are
    our client certificate, for peers that require one.  A failed handshake is a failed
    attempt (retried, then dead-lettered) whose error says why.
    """

    name: str
    host: str
    port: int
    ae_title: str
    calling_ae: str = "RTCONTRAST"
    connect_timeout_s: float = 10.0
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    max_pdu: int = 16382
    tls: bool = False
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_server_hostname: str | None = None


@dataclass(frozen=True)
class FolderDestination:
    """A directory (an import folder, a share): ``<path>/<Study>/<Series>/<SOP>.dcm``."""

    name: str
    path: Path


Destination = Union[DicomDestination, FolderDestination]


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff: attempt n waits base * 2**(n-1), +-jitter, capped.

    With the proportional jitter below 1/3 each wait is longer than the previous one
    until the cap, so a down peer sees fewer and fewer attempts, never a retry storm.
    """

    max_attempts: int = 10
    base_delay_s: float = 10.0
    max_delay_s: float = 900.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.base_delay_s < 0 or self.max_delay_s < self.base_delay_s:
            raise ValueError("need 0 <= base_delay_s <= max_delay_s")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (attempts >= 1)."""
        rng = rng or random
        raw = self.base_delay_s * (2.0 ** max(0, min(attempts - 1, 60)))
        jittered = raw * (1.0 + self.jitter * (2.0 * rng.random() - 1.0))
        return min(self.max_delay_s, jittered)


@dataclass(frozen=True)
class OutboxItem:
    """One row of the outbox: an instance for one destination, as an admin sees it."""

    id: int
    job_id: str
    destination: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    study_instance_uid: str
    series_instance_uid: str
    path: Path
    state: str
    attempts: int
    generation: int
    next_attempt_at: float
    created_at: float
    updated_at: float
    delivered_at: float | None
    last_status: int | None
    last_error: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> OutboxItem:
        d = dict(row)
        d["path"] = Path(d["path"])
        return cls(**d)


@dataclass
class Outcome:
    """What happened to one item in one attempt."""

    delivered: bool
    status: int | None = None
    error: str | None = None


# -- file helpers ------------------------------------------------------------------
def _safe_name(text: str, what: str) -> str:
    """Reject names that would escape the outbox directory."""
    if not text or text in (".", "..") or any(c in text for c in "/\\\0") or text.startswith("."):
        raise ValueError(f"{what} {text!r} cannot be used as a directory/file name")
    return text


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(dest: Path, write: Callable[[BinaryIO], None], sync_dir: bool = True) -> None:
    """Write ``dest`` via a hidden temp file in the same directory, fsync, rename.

    ``sync_dir=False`` leaves the directory fsync (which makes the rename durable) to
    the caller, who writes many files into one folder and syncs it once.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        _fsync_dir(dest.parent)


def atomic_copy(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` so that ``dest`` is either absent or complete."""
    with open(src, "rb") as fin:
        _atomic_write(dest, lambda fh: shutil.copyfileobj(fin, fh, 1 << 20))


def _ensure_file_meta(ds: Dataset) -> None:
    """Give a dataset built in memory the file meta a Part 10 file needs."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if "ImplementationClassUID" not in meta:
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID


@dataclass
class _Prepared:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    study_instance_uid: str
    series_instance_uid: str
    path: Path


# -- the outbox --------------------------------------------------------------------
class Outbox:
    """The durable queue of instances to deliver, per destination.

    ``conn`` comes from :func:`rtcontrast.db.connect`; the Outbox serialises its own use
    of it with a lock (the Sender thread and the pipeline share it), so give the Outbox
    a connection that nothing else uses concurrently.
    """

    def __init__(self, conn: sqlite3.Connection, root: Path) -> None:
        self.conn = conn
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        conn.executescript(_SCHEMA)  # in case the connection predates this import

    # -- enqueue -------------------------------------------------------------------
    def enqueue(
        self,
        job_id: int | str,
        destination: str,
        items: Iterable[Dataset | str | os.PathLike[str]],
        now: float | None = None,
    ) -> list[int]:
        """Queue datasets (or DICOM files) for ``destination``; returns the row ids.

        Each instance is first written durably under the outbox root, then every row is
        inserted in one transaction, due at ``now``.  Enqueuing an instance already
        present for the same destination and job replaces its file and makes it pending
        again (attempts reset): that is how a job is re-sent.
        """
        now = time.time() if now is None else now
        job = _safe_name(str(job_id), "job id")
        _safe_name(destination, "destination name")
        folder = self.root / destination / job
        prepared = [self._write(item, folder) for item in items]
        if prepared:
            _fsync_dir(folder)  # one directory sync makes every rename durable before the rows exist
        ids: list[int] = []
        with self.lock, transaction(self.conn) as c:
            for p in prepared:
                row = c.execute(
                    """
                    INSERT INTO outbox_items (job_id, destination, sop_instance_uid, sop_class_uid,
                        transfer_syntax_uid, study_instance_uid, series_instance_uid, path, state,
                        attempts, generation, next_attempt_at, created_at, updated_at)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending', 0, 0, ?, ?, ?)
                    ON CONFLICT (destination, job_id, sop_instance_uid) DO UPDATE SET
                        sop_class_uid = excluded.sop_class_uid,
                        transfer_syntax_uid = excluded.transfer_syntax_uid,
                        study_instance_uid = excluded.study_instance_uid,
                        series_instance_uid = excluded.series_instance_uid,
                        path = excluded.path, state = 'pending', attempts = 0,
                        generation = outbox_items.generation + 1,
                        next_attempt_at = excluded.next_attempt_at,
                        updated_at = excluded.updated_at, delivered_at = NULL,
                        last_status = NULL, last_error = NULL
                    RETURNING id
                    """,
                    (job, destination, p.sop_instance_uid, p.sop_class_uid, p.transfer_syntax_uid,
                     p.study_instance_uid, p.series_instance_uid, str(p.path), now, now, now),
                ).fetchone()
                ids.append(int(row[0]))
        log.info("outbox: queued %d instance(s) of job %s for %s", len(ids), job, destination)
        return ids

    def _write(self, item: Dataset | str | os.PathLike[str], folder: Path) -> _Prepared:
        if isinstance(item, Dataset):
            ds = item
            _ensure_file_meta(ds)
            sop = _safe_name(str(ds.SOPInstanceUID), "SOPInstanceUID")
            dest = folder / f"{sop}.dcm"
            _atomic_write(dest, lambda fh: ds.save_as(fh, enforce_file_format=True), sync_dir=False)
            meta = ds.file_meta
        else:
            src = Path(item)
            ds = pydicom.dcmread(src, stop_before_pixels=True)
            meta = ds.file_meta
            for kw in ("TransferSyntaxUID",):
                if kw not in meta:
                    raise ValueError(f"{src}: no {kw} in the file meta; not a DICOM Part 10 file")
            sop = _safe_name(str(ds.SOPInstanceUID), "SOPInstanceUID")
            dest = folder / f"{sop}.dcm"
            atomic_copy(src, dest)
        return _Prepared(
            sop_instance_uid=sop,
            sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax_uid=str(meta.TransferSyntaxUID),
            study_instance_uid=str(ds.get("StudyInstanceUID", "")),
            series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
            path=dest,
        )

    # -- queries -------------------------------------------------------------------
    def _query(self, sql: str, args: Sequence[object] = ()) -> list[OutboxItem]:
        with self.lock:
            rows = self.conn.execute(sql, tuple(args)).fetchall()
        return [OutboxItem.from_row(r) for r in rows]

    def items(
        self, job_id: int | str | None = None, destination: str | None = None, state: str | None = None
    ) -> list[OutboxItem]:
        """Rows filtered by job, destination and/or state (audit, status pages)."""
        where, args = self._filter(job_id, destination, state)
        return self._query(f"SELECT * FROM outbox_items {where} ORDER BY id", args)

    @staticmethod
    def _filter(
        job_id: int | str | None, destination: str | None, state: str | None
    ) -> tuple[str, list[object]]:
        clauses: list[str] = []
        args: list[object] = []
        if job_id is not None:
            clauses.append("job_id = ?")
            args.append(str(job_id))
        if destination is not None:
            clauses.append("destination = ?")
            args.append(destination)
        if state is not None:
            if state not in STATES:
                raise ValueError(f"unknown outbox state {state!r}; one of {', '.join(STATES)}")
            clauses.append("state = ?")
            args.append(state)
        return ("WHERE " + " AND ".join(clauses) if clauses else ""), args

    def due(self, now: float, limit_per_destination: int = 1000) -> dict[str, list[OutboxItem]]:
        """Pending rows whose next attempt is due, grouped by destination, oldest first."""
        out: dict[str, list[OutboxItem]] = {}
        with self.lock:
            dests = [
                r[0]
                for r in self.conn.execute(
                    "SELECT DISTINCT destination FROM outbox_items WHERE state = 'pending' AND next_attempt_at <= ?",
                    (now,),
                )
            ]
        for dest in dests:
            out[dest] = self._query(
                "SELECT * FROM outbox_items WHERE state = 'pending' AND destination = ? AND next_attempt_at <= ? "
                "ORDER BY job_id, id LIMIT ?",
                (dest, now, limit_per_destination),
            )
        return out

    def dead_letters(self, destination: str | None = None, job_id: int | str | None = None) -> list[OutboxItem]:
        """Rows that ran out of attempts, with their last status and error."""
        return self.items(job_id=job_id, destination=destination, state=DEAD_LETTER)

    def retry_dead(
        self, destination: str | None = None, job_id: int | str | None = None, now: float | None = None
    ) -> int:
        """Put dead letters back to pending (attempts reset, due now); returns how many.

        The file must still be in the outbox (dead letters keep theirs); a row whose file
        is gone stays dead and is logged, since re-sending it cannot work.
        """
        now = time.time() if now is None else now
        where, args = self._filter(job_id, destination, DEAD_LETTER)
        n = 0
        with self.lock, transaction(self.conn) as c:
            for row in c.execute(f"SELECT id, path, sop_instance_uid FROM outbox_items {where}", args).fetchall():
                if not Path(row["path"]).exists():
                    log.error("outbox: cannot retry %s: file %s is gone", row["sop_instance_uid"], row["path"])
                    continue
                c.execute(
                    "UPDATE outbox_items SET state = 'pending', attempts = 0, next_attempt_at = ?, updated_at = ?, "
                    "generation = generation + 1 WHERE id = ?",
                    (now, now, row["id"]),
                )
                n += 1
        log.info("outbox: %d dead letter(s) put back to pending (destination=%s job=%s)", n, destination, job_id)
        return n

    def counts(self) -> dict[str, dict[str, int]]:
        """``{destination: {state: n}}`` with every state present (0 when none)."""
        with self.lock:
            rows = self.conn.execute(
                "SELECT destination, state, COUNT(*) FROM outbox_items GROUP BY destination, state"
            ).fetchall()
        out: dict[str, dict[str, int]] = {}
        for dest, state, n in rows:
            out.setdefault(dest, dict.fromkeys(STATES, 0))[state] = int(n)
        return out

    def job_counts(self, job_id: int | str) -> dict[str, int]:
        """``{state: n}`` over every destination for one job."""
        with self.lock:
            rows = self.conn.execute(
                "SELECT state, COUNT(*) FROM outbox_items WHERE job_id = ? GROUP BY state", (str(job_id),)
            ).fetchall()
        out = dict.fromkeys(STATES, 0)
        out.update({s: int(n) for s, n in rows})
        return out

    def pending_for_job(self, job_id: int | str) -> int:
        """How many of the job's instances are not yet delivered nor dead (0: job done)."""
        return self.job_counts(job_id)[PENDING]

    def prune(self, delivered_before: float) -> int:
        """Retention: drop rows delivered before ``delivered_before`` (epoch s) and their files.

        Pending and dead-letter rows are never pruned: they are work still owed.
        """
        with self.lock, transaction(self.conn) as c:
            rows = c.execute(
                "SELECT id, path FROM outbox_items WHERE state = 'delivered' AND delivered_at < ?",
                (delivered_before,),
            ).fetchall()
            c.executemany("DELETE FROM outbox_items WHERE id = ?", [(r["id"],) for r in rows])
        for r in rows:
            path = Path(r["path"])
            path.unlink(missing_ok=True)
            try:
                path.parent.rmdir()  # the job directory, once empty
            except OSError:
                pass
        return len(rows)

    # -- outcomes ------------------------------------------------------------------
    def record(
        self,
        results: Sequence[tuple[OutboxItem, Outcome]],
        policy: RetryPolicy,
        now: float,
        rng: random.Random | None = None,
        delete_delivered: bool = True,
    ) -> None:
        """Apply one batch of outcomes in one transaction.

        A row that was enqueued again while it was being sent (its generation moved)
        is left alone: the newer file still has to go out.
        """
        to_delete: list[Path] = []
        with self.lock, transaction(self.conn) as c:
            for item, res in results:
                if res.delivered:
                    cur = c.execute(
                        "UPDATE outbox_items SET state = 'delivered', attempts = attempts + 1, delivered_at = ?, "
                        "updated_at = ?, last_status = ?, last_error = ? WHERE id = ? AND generation = ?",
                        (now, now, res.status, res.error, item.id, item.generation),
                    )
                    if cur.rowcount and delete_delivered:
                        to_delete.append(item.path)
                    continue
                attempts = item.attempts + 1
                if attempts >= policy.max_attempts:
                    state, nxt = DEAD_LETTER, now
                    log.error(
                        "outbox: %s -> %s dead-lettered after %d attempts: %s",
                        item.sop_instance_uid, item.destination, attempts, res.error,
                    )
                else:
                    state, nxt = PENDING, now + policy.delay(attempts, rng)
                c.execute(
                    "UPDATE outbox_items SET state = ?, attempts = ?, next_attempt_at = ?, updated_at = ?, "
                    "last_status = ?, last_error = ? WHERE id = ? AND generation = ?",
                    (state, attempts, nxt, now, res.status, res.error, item.id, item.generation),
                )
        for path in to_delete:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:  # audit row is what matters; a stale file is harmless
                log.warning("outbox: could not delete delivered file %s: %s", path, exc)


# -- sending -----------------------------------------------------------------------
def _set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: turn Nagle off (DCMTK peers otherwise stall ~40 ms per PDU)."""
    import socket

    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _contexts_for(ts: str) -> list[str]:
    """Transfer syntaxes to offer for a file in ``ts``: uncompressed files may be converted."""
    if UID(ts) in _UNCOMPRESSED:
        return [ts] + [str(t) for t in _UNCOMPRESSED if t != ts]
    return [ts]


def _chunks_by_context(items: Sequence[OutboxItem]) -> list[list[OutboxItem]]:
    """Split items so that no association needs more than MAX_CONTEXTS contexts."""
    chunks: list[list[OutboxItem]] = []
    current: list[OutboxItem] = []
    keys: set[tuple[str, str]] = set()
    for it in items:
        key = (it.sop_class_uid, it.transfer_syntax_uid)
        if key not in keys and len(keys) >= MAX_CONTEXTS:
            chunks.append(current)
            current, keys = [], set()
        keys.add(key)
        current.append(it)
    if current:
        chunks.append(current)
    return chunks


class _RecordingSSLSocket(ssl.SSLSocket):
    """Keeps the handshake error on its context: pynetdicom only logs it, we report it."""

    def connect(self, addr: object) -> None:  # type: ignore[override]
        try:
            super().connect(addr)  # type: ignore[arg-type]
        except OSError as exc:
            ctx = self.context
            if isinstance(ctx, _ClientContext):
                ctx.handshake_error = exc
            raise


class _ClientContext(ssl.SSLContext):
    """A client TLS context that remembers why its last handshake failed."""

    handshake_error: BaseException | None = None


def client_ssl_context(dest: DicomDestination) -> ssl.SSLContext:
    """TLS 1.2+ client context for ``dest``: server verification and hostname check on.

    Raises ``OSError``/``ssl.SSLError`` when a file is missing or unusable.
    """
    ctx = _ClientContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if dest.tls_ca_file:
        ctx.load_verify_locations(cafile=dest.tls_ca_file)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if dest.tls_cert_file:
        ctx.load_cert_chain(dest.tls_cert_file, dest.tls_key_file)
    ctx.sslsocket_class = _RecordingSSLSocket
    return ctx


def send_dicom(dest: DicomDestination, items: Sequence[OutboxItem]) -> list[Outcome]:
    """C-STORE ``items`` over one association per <=128 contexts; one Outcome per item."""
    outcomes: list[Outcome] = []
    for chunk in _chunks_by_context(items):
        outcomes.extend(_send_chunk(dest, chunk))
    return outcomes


def _send_chunk(dest: DicomDestination, items: Sequence[OutboxItem]) -> list[Outcome]:
    ae = AE(ae_title=dest.calling_ae)
    ae.connection_timeout = dest.connect_timeout_s
    ae.acse_timeout = dest.acse_timeout_s
    ae.dimse_timeout = dest.dimse_timeout_s
    ae.network_timeout = dest.network_timeout_s
    ae.maximum_pdu_size = dest.max_pdu
    seen: set[tuple[str, str]] = set()
    for it in items:
        key = (it.sop_class_uid, it.transfer_syntax_uid)
        if key not in seen:
            seen.add(key)
            ae.add_requested_context(it.sop_class_uid, _contexts_for(it.transfer_syntax_uid))
    where = f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port}{', TLS' if dest.tls else ''})"
    ctx: ssl.SSLContext | None = None
    if dest.tls:
        try:
            ctx = client_ssl_context(dest)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            err = f"TLS set-up for {where} failed (ca/cert/key files): {exc}"
            log.error("outbox: %s", err)
            return [Outcome(False, None, err) for _ in items]
    try:
        assoc = ae.associate(
            dest.host,
            dest.port,
            ae_title=dest.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, _set_nodelay)],
            tls_args=None if ctx is None else (ctx, dest.tls_server_hostname or dest.host),
        )
    except (OSError, ValueError) as exc:
        err = f"association to {where} failed: {exc}"
        log.warning("outbox: %s", err)
        return [Outcome(False, None, err) for _ in items]
    if not assoc.is_established:
        handshake_error = getattr(ctx, "handshake_error", None)
        if handshake_error is not None:
            err = f"TLS handshake with {where} failed: {handshake_error}"
        elif assoc.is_rejected:
            err = f"association rejected by {where}"
        elif assoc.is_aborted:
            err = f"association aborted by {where}"
        else:
            err = f"association to {where} failed (peer unreachable or timed out)"
        log.warning("outbox: %s", err)
        return [Outcome(False, None, err) for _ in items]

    outcomes: list[Outcome] = []
    try:
        for it in items:
            if not assoc.is_established:
                outcomes.append(Outcome(False, None, f"association to {where} ended before this instance was sent"))
                continue
            outcomes.append(_store_one(assoc, it, where))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


def _store_one(assoc: object, it: OutboxItem, where: str) -> Outcome:
    if not it.path.exists():
        err = f"outbox file {it.path} is missing"
        log.error("outbox: %s -> %s: %s", it.sop_instance_uid, where, err)
        return Outcome(False, None, err)
    try:
        status = assoc.send_c_store(it.path)  # type: ignore[attr-defined]
    except (ValueError, AttributeError, OSError) as exc:
        # No accepted presentation context, unreadable file, ...: this item fails.
        err = f"C-STORE not sent: {exc}"
        log.warning("outbox: %s -> %s: %s", it.sop_instance_uid, where, err)
        return Outcome(False, None, err)
    code = getattr(status, "Status", None)
    if code is None:
        err = "no C-STORE response (timeout, abort or invalid response)"
        log.warning("outbox: %s -> %s: %s", it.sop_instance_uid, where, err)
        return Outcome(False, None, err)
    code = int(code)
    comment = str(status.get("ErrorComment", "")) if hasattr(status, "get") else ""
    if code == 0x0000:
        return Outcome(True, code, None)
    if code in WARNING_STATUSES:
        msg = f"warning 0x{code:04X} ({WARNING_STATUSES[code]}){': ' + comment if comment else ''}"
        log.warning("outbox: %s -> %s stored with %s", it.sop_instance_uid, where, msg)
        return Outcome(True, code, msg)
    err = f"C-STORE failed with status 0x{code:04X}{': ' + comment if comment else ''}"
    log.warning("outbox: %s -> %s: %s", it.sop_instance_uid, where, err)
    return Outcome(False, code, err)


def send_folder(dest: FolderDestination, items: Sequence[OutboxItem]) -> list[Outcome]:
    """Copy each file to ``<path>/<Study>/<Series>/<SOP>.dcm`` atomically."""
    outcomes: list[Outcome] = []
    for it in items:
        target = Path(dest.path)
        for part in (it.study_instance_uid, it.series_instance_uid):
            if part:
                target = target / part
        try:
            atomic_copy(it.path, target / f"{it.sop_instance_uid}.dcm")
            outcomes.append(Outcome(True, None, None))
        except OSError as exc:
            err = f"copy to {dest.name} ({dest.path}) failed: {exc}"
            log.warning("outbox: %s: %s", it.sop_instance_uid, err)
            outcomes.append(Outcome(False, None, err))
    return outcomes


@dataclass
class Sender:
    """Delivers what the :class:`Outbox` holds: :meth:`run_once` or a background thread."""

    outbox: Outbox
    destinations: dict[str, Destination]
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    poll_interval_s: float = 1.0
    batch_size: int = 500
    delete_delivered: bool = True
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._run_lock = threading.Lock()

    def run_once(self, now: float | None = None) -> int:
        """Send everything due at ``now``; returns how many instances were delivered."""
        now = time.time() if now is None else now
        delivered = 0
        with self._run_lock:
            for name, items in self.outbox.due(now, self.batch_size).items():
                dest = self.destinations.get(name)
                if dest is None:
                    err = f"destination {name!r} is not configured"
                    log.error("outbox: %d item(s) for %s", len(items), err)
                    outcomes = [Outcome(False, None, err) for _ in items]
                elif isinstance(dest, FolderDestination):
                    outcomes = send_folder(dest, items)
                else:
                    outcomes = send_dicom(dest, items)
                self.outbox.record(list(zip(items, outcomes)), self.policy, now, self.rng, self.delete_delivered)
                ok = sum(1 for o in outcomes if o.delivered)
                delivered += ok
                log.info("outbox: %s: %d delivered, %d failed", name, ok, len(items) - ok)
        return delivered

    # -- background mode -----------------------------------------------------------
    def start(self) -> None:
        """Run :meth:`run_once` in a daemon thread every ``poll_interval_s`` (or on wake)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="outbox-sender", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Ask the background thread to look for due items now (e.g. after enqueue)."""
        self._wake.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the background thread after its current batch (bounded by ``timeout_s``)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("outbox: sender thread still busy after %.0f s", timeout_s)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once(time.time())
            except Exception:  # keep delivering: one bad batch must not stop the node
                log.exception("outbox: sender iteration failed")
            self._wake.wait(self.poll_interval_s)
            self._wake.clear()
