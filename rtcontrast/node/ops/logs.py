"""Logging set-up of the node: one line per event, plain text or JSON, never patient data.

Why a module of its own: the node, the CLI and the tests must configure logging the same
way (one handler on the root logger, UTC timestamps, the thread name so the SCP, the
worker and the sender can be told apart), and ``log_format: json`` must give one JSON
object per line for a log shipper.

PHI: modules log UIDs, AE titles, states and numbers only (refer to series by UID).  As
a second line of defence :class:`PHIFilter` drops any record whose message still carries a
value of PatientName, PatientID or PatientBirthDate written as ``Keyword=value`` /
``Keyword: value`` (what a careless ``str(dataset)`` or f-string would produce) and
logs a replacement line that says a record was suppressed.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import MutableMapping
from typing import IO, Any

__all__ = ["setup_logging", "JsonFormatter", "PlainFormatter", "PHIFilter", "ContextAdapter", "with_context"]

_PHI_RE = re.compile(
    r"(Patient'?s? ?Name|PatientID|Patient ID|PatientBirthDate|Patient'?s? Birth Date|\(0010, ?00(10|20|30)\))",
    re.IGNORECASE,
)
# Fields every LogRecord has; anything else passed with extra= goes into the JSON object.
_STD_ATTRS = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class PHIFilter(logging.Filter):
    """Replace records that mention patient identifying attributes with a neutral line."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a broken format string: let the handler report it
            return True
        if _PHI_RE.search(text) or (record.exc_text and _PHI_RE.search(record.exc_text)):
            record.msg = "log record suppressed: it named a patient identifying attribute (logger %s)"
            record.args = (record.name,)
            record.exc_info = None
            record.exc_text = None
            record.levelno = max(record.levelno, logging.WARNING)
            record.levelname = logging.getLevelName(record.levelno)
        return True


# Fields a log shipper filters on: job, series_uid, stage, destination.  Set with ``extra=`` or
# :func:`with_context`; for lines that only name a job or series in their text ("job 12 series
# 1.2.3 ..."), :class:`JsonFormatter` reads them from it.
_TEXT_FIELDS = (
    ("job", re.compile(r"\bjob (\d+)\b")),
    ("series_uid", re.compile(r"\bseries ((?:\d+\.)+\d+)\b")),
)


class ContextAdapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger that adds fixed fields (job, series_uid, stage, destination) to every record.

    Why: JSON logs must carry these as keys a collector can filter on, not only inside the
    message text; a call's own ``extra=`` adds to (and overrides) the adapter's fields.
    """

    def process(self, msg: object, kwargs: MutableMapping[str, Any]) -> tuple[object, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


def with_context(logger: logging.Logger, **fields: object) -> ContextAdapter:
    """``with_context(log, job=12, series_uid=uid, stage="infer").info("...")``."""
    return ContextAdapter(logger, {k: v for k, v in fields.items() if v is not None})


class PlainFormatter(logging.Formatter):
    """``2024-01-02T10:15:00.123Z INFO rtcontrast.node.service [worker] message``."""

    converter = time.gmtime

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        t = time.gmtime(record.created)
        return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, thread, msg (+ exc, + extra fields).

    ``job``, ``series_uid``, ``stage``, ``destination`` come from ``extra=`` /
    :class:`ContextAdapter`; a line that names a job or series only in its text gets
    them from there, so every line about a job can be filtered by it.
    """

    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        obj: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                obj[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        for key, rx in _TEXT_FIELDS:
            if key not in obj and (m := rx.search(str(obj["msg"]))):
                obj[key] = int(m.group(1)) if key == "job" else m.group(1)
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False)


def setup_logging(fmt: str = "plain", level: str = "INFO", stream: IO[str] | None = None) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) as ``fmt`` ('plain' or 'json').

    Replaces handlers a previous call installed (so a test or a re-configuration does not
    print every line twice) and quiets pynetdicom's per-PDU chatter to WARNING.
    Returns the handler (tests read or remove it).
    """
    if fmt not in ("plain", "json"):
        raise ValueError(f"log format must be 'plain' or 'json', got {fmt!r}")
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_rtcontrast", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._rtcontrast = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    handler.addFilter(PHIFilter())
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    return handler
