"""ops/ (Grafana dashboard, Prometheus alert rules) only uses metrics the node exports, in valid PromQL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rtcontrast.node.ops.metrics import NodeMetrics, QueueSnapshot

promql_parser = pytest.importorskip("promql_parser", reason="promql-parser (test extra) parses the expressions")

OPS = Path(__file__).resolve().parent.parent / "ops"


def exported_names() -> set[str]:
    """Every sample name a node's registry exposes (with gauges read from a snapshot), plus ``up``."""
    m = NodeMetrics()
    m.set_model("qmap", "1", "ab" * 32, "CPUExecutionProvider")
    m.set_protocol("1+sha256:x", 7)
    m.set_destinations(["tps"])
    m.observe_job("delivered", {"infer": 1.0})
    m.add_snapshot_source(lambda: QueueSnapshot({"queued": 1}, {"tps": {"pending": 1, "dead_letter": 0}}, 10))
    return {s.name for fam in m.registry.collect() for s in fam.samples} | {"up"}


def metric_names(expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def test_alert_rules_are_valid_and_use_exported_metrics() -> None:
    doc = yaml.safe_load((OPS / "prometheus-alerts.yml").read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert len(rules) >= 6
    known = exported_names()
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, r
        assert r["labels"]["severity"] in {"critical", "warning", "info"} and r["annotations"]["summary"]
        names = metric_names(r["expr"])
        assert names and names <= known, (r["alert"], names - known)
    assert {"RtcontrastDown", "RtcontrastDeadLetters", "RtcontrastDiskLow"} <= {r["alert"] for r in rules}


def test_dashboard_queries_use_exported_metrics() -> None:
    dash = json.loads((OPS / "grafana-dashboard.json").read_text())
    known = exported_names()
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 12
    seen: set[str] = set()
    for e in exprs:
        names = metric_names(e.replace("$__rate_interval", "5m"))
        assert names <= known, (e, names - known)
        seen |= names
    for must in ("rtcontrast_dead_letters", "rtcontrast_outbox_pending", "rtcontrast_build_info",
                 "rtcontrast_stage_duration_seconds_bucket", "rtcontrast_free_disk_bytes"):
        assert must in seen, must
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] == "rtcontrast-node"
