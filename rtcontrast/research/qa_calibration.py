"""Calibrate a ``qmap/3`` model's uncertainty QA limits on in-domain series (research side).

Why: a model's predicted sd has its own scale.  A fixed protocol limit (35 % median relative
sd) held every pelvis series of ``qmap-se`` 1.0.0 (its in-domain medians were 57-90 %), so
the node could not use the model's uncertainty at all.  The limit that means "this series
looks like nothing the model was trained on" is a property of the model; it is set here
from in-domain series only - pelvis phantoms of seeds that neither training (seeds below
1,000,000), training validation (1,000,000+) nor the evaluation split (1,000,500+) uses -
and never from the unseen-anatomy split, which stays a test.

Rule: per figure (median relative sd of T1, T2, PD over the judged body voxels, exactly as
the node computes it: :func:`rtcontrast.core.uncertainty_qa.series_qa` on the voxels above
5 % of the series scale), the largest value over the calibration series (every seed
contrast, 1.5 and 3 T) times :data:`MARGIN`.  The limits go into the ONNX metadata
(``rtcontrast.qa_limits``), where the node reads them, and into the card with the figures.

    python -m rtcontrast.research.qa_calibration models/qmap-se.onnx [--write]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx

from rtcontrast.core.contract import QA_LIMIT_NAMES, QA_LIMITS_KEY
from rtcontrast.core.inference import QMapModel
from rtcontrast.core.physics import SEED_CONTRAST_NAMES, SEED_CONTRASTS
from rtcontrast.core.uncertainty_qa import node_body_mask, series_qa
from rtcontrast.research import phantom
from rtcontrast.research.dataset import HELDOUT_SEED_BASE

#: Pelvis seeds of the calibration series (after training validation and the evaluation split).
CALIB_SEED_BASE = HELDOUT_SEED_BASE + 700
#: Headroom over the largest in-domain figure: noisier scanners than the phantoms still pass.
MARGIN = 1.15


def calibration_figures(model: QMapModel, n_subjects: int = 6, n_slices: int = 4) -> list[dict[str, object]]:
    """Per calibration series: input, field and the node's uncertainty figures."""
    rows: list[dict[str, object]] = []
    for k in range(n_subjects):
        seed = CALIB_SEED_BASE + k
        field_t = (1.5, 3.0)[k % 2]
        maps, _ = phantom.volume(seed, n_slices=n_slices, shape=(256, 256), pixel_mm=1.6, slice_mm=12.0,
                                 field_t=field_t)
        for name, (te, tr) in zip(SEED_CONTRAST_NAMES, SEED_CONTRASTS):
            rng = np.random.default_rng(seed * 31 + int(te) * 7 + int(tr))
            acq = phantom.acquire(maps, te, tr, rng, snr=float(rng.uniform(30, 100)))
            pred = model.predict(acq.image, te, tr, field_t=field_t)
            res = series_qa(pred, node_body_mask(acq.image, pred.scale))
            rows.append({"seed": seed, "input": name, "field_t": field_t,
                         **{key: round(res.values[key], 4) for key in QA_LIMIT_NAMES if key in res.values}})
    return rows


def limits_from(rows: list[dict[str, object]], margin: float = MARGIN) -> dict[str, float]:
    """The largest figure of each kind over ``rows`` times ``margin`` (kinds without figures are left out)."""
    out = {}
    for key in QA_LIMIT_NAMES:
        vals = [float(r[key]) for r in rows if key in r]  # type: ignore[arg-type]
        if vals:
            out[key] = round(max(vals) * margin, 3)
    return out


def write_metadata(onnx_path: Path, limits: dict[str, float]) -> str:
    """Put ``limits`` into the model's metadata (``rtcontrast.qa_limits``); returns the JSON text written."""
    m = onnx.load(str(onnx_path))
    props = {p.key: p.value for p in m.metadata_props}
    props[QA_LIMITS_KEY] = json.dumps(limits, sort_keys=True)
    del m.metadata_props[:]
    for k, v in props.items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, str(onnx_path))
    return props[QA_LIMITS_KEY]


def card_entry(limits: dict[str, float], rows: list[dict[str, object]]) -> dict[str, object]:
    """The card's ``qa_calibration``: rule, split, limits and every figure behind them."""
    return {
        "rule": f"largest in-domain figure x {MARGIN} (rtcontrast.research.qa_calibration)",
        "split": {"kind": "pelvis phantoms (rtcontrast.research.phantom), phantom.acquire, node body mask",
                  "seeds": [CALIB_SEED_BASE, CALIB_SEED_BASE + len({r['seed'] for r in rows}) - 1],
                  "inputs": list(SEED_CONTRAST_NAMES), "fields_t": [1.5, 3.0]},
        "limits": limits,
        "figures": rows,
    }


def calibrate_into(onnx_path: Path, n_subjects: int = 6) -> dict[str, object]:
    """Calibrate ``onnx_path`` and write its limits into its metadata; returns the card entry."""
    rows = calibration_figures(QMapModel(onnx_path, provider="cpu"), n_subjects)
    limits = limits_from(rows)
    write_metadata(onnx_path, limits)
    return card_entry(limits, rows)


def write_limits(onnx_path: Path, limits: dict[str, float], rows: list[dict[str, object]]) -> str:
    """Put ``limits`` into the model's metadata and card (with the figures); returns the new sha256."""
    text = write_metadata(onnx_path, limits)
    sha = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    card_path = onnx_path.with_suffix(".json")
    if card_path.is_file():
        card = json.loads(card_path.read_text())
        card["sha256"] = sha
        card.setdefault("metadata", {})[QA_LIMITS_KEY] = text
        card["qa_calibration"] = card_entry(limits, rows)
        card_path.write_text(json.dumps(card, indent=2) + "\n")
    return sha


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rtcontrast.research.qa_calibration", description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--subjects", type=int, default=6)
    ap.add_argument("--write", action="store_true", help="write the limits into the ONNX metadata and the card")
    a = ap.parse_args(argv)
    model = QMapModel(a.model, provider="cpu")
    if not model.uncertainty_outputs:
        raise SystemExit(f"{a.model}: the model has no uncertainty outputs; nothing to calibrate")
    rows = calibration_figures(model, a.subjects)
    limits = limits_from(rows)
    for r in rows:
        print(json.dumps(r))
    print("limits:", json.dumps(limits))
    if a.write:
        print("sha256:", write_limits(a.model, limits, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
