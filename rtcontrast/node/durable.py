"""Durable files and lean sockets: the basics the spool (scanner side) and the outbox (TPS side) share.

Why one module: both sides promise the same thing — a file is either absent or complete
and survives a power cut once the caller is told so (temp file, fsync, rename, directory
fsync) — and both talk DICOM over TCP where Nagle's algorithm with delayed ACKs costs
about 40 ms per request/response round trip.  One implementation keeps the promises the
same on both sides.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or creation inside it is durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(dest: Path, write: Callable[[BinaryIO], None], sync_dir: bool = True) -> None:
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
        fsync_dir(dest.parent)


def atomic_copy(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` so that ``dest`` is either absent or complete."""
    with open(src, "rb") as fin:
        atomic_write(dest, lambda fh: shutil.copyfileobj(fin, fh, 1 << 20))


def ensure_file_meta(ds: Dataset) -> None:
    """Give a dataset the file meta a Part 10 file needs (kept where it is already there)."""
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


def set_nodelay(event: Any) -> None:
    """pynetdicom EVT_CONN_OPEN handler (both directions): turn Nagle off on the association's socket."""
    sock = getattr(getattr(getattr(event, "assoc", None) and event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
