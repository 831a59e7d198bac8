"""JSON logs carry job, series, stage and destination as fields (#16), never patient data."""

from __future__ import annotations

import io
import json
import logging

from rtcontrast.node.ops.logs import setup_logging, with_context


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(x) for x in stream.getvalue().splitlines()]


def test_json_fields_from_context_extra_and_text() -> None:
    stream = io.StringIO()
    handler = setup_logging("json", "INFO", stream)
    try:
        log = logging.getLogger("rtcontrast.test.logs")
        with_context(log, job=12, series_uid="1.2.3.4", stage="infer").info("maps estimated in %.1f s", 2.5)
        log.warning("outbox: %d failed", 3, extra={"job": "7", "series_uid": "1.2.9", "destination": "tps"})
        log.info("job %d series %s queued: 7 to tps", 42, "1.2.840.99.1")  # fields only in the text
        log.info("series completed: 30 instances")  # no job: no job field
        log.info("PatientName=DOE^JOHN arrived")
    finally:
        logging.getLogger().removeHandler(handler)
    a, b, c, d, e = _lines(stream)
    assert (a["job"], a["series_uid"], a["stage"], a["msg"]) == (12, "1.2.3.4", "infer", "maps estimated in 2.5 s")
    assert (b["job"], b["series_uid"], b["destination"], b["level"]) == ("7", "1.2.9", "tps", "WARNING")
    assert (c["job"], c["series_uid"]) == (42, "1.2.840.99.1")
    assert "job" not in d and "series_uid" not in d
    assert "DOE" not in json.dumps(e) and "suppressed" in e["msg"]
