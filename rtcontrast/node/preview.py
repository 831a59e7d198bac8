"""QA preview: one PNG montage per job, for the admin who decides on a held series.

Why: a QA number (self NRMSE 0.31) does not tell an admin whether the maps are wrong or
the input was odd (motion, coil drop-out, a contrast the model never saw).  One picture
of the middle slice - the input, the PD/T1/T2 maps, and every synthetic contrast the
protocol renders - answers that in a second, without a DICOM viewer on the node.

The montage is written to ``<var>/jobs/<job_id>/preview.png`` by the pipeline (through
:attr:`rtcontrast.node.pipeline.PipelineContext.job_dir`).  Titles carry the job id, the
series UID, QA numbers and recipe labels: never patient data.  matplotlib's Agg
backend renders off-screen (no display on a server).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_preview", "PREVIEW_NAME"]

PREVIEW_NAME = "preview.png"
_COLS = 4


def _window(img: np.ndarray) -> tuple[float, float]:
    nz = img[np.isfinite(img) & (img > 0)]
    if nz.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(nz, [1.0, 99.5]))
    return lo, max(hi, lo + 1e-6)


def write_preview(
    path: Path,
    input_pixels: np.ndarray,
    maps: Mapping[str, np.ndarray],
    contrasts: Mapping[str, np.ndarray],
    title: str,
    qa: Mapping[str, Any] | None = None,
) -> Path:
    """Write the montage of the middle slice to ``path`` (atomically); returns ``path``.

    ``input_pixels`` and every array in ``maps`` (e.g. ``{"PD": .., "T1 [ms]": ..,
    "T2 [ms]": ..}``) and ``contrasts`` (label -> rendered volume) are [N, H, W].
    """
    from matplotlib.figure import (
        Figure,  # no pyplot: no global backend state; savefig renders with Agg
    )

    z = input_pixels.shape[0] // 2
    panels: list[tuple[str, np.ndarray, str]] = [(f"input (slice {z + 1}/{input_pixels.shape[0]})", input_pixels[z], "gray")]
    for name, vol in maps.items():
        panels.append((name, vol[z], "viridis"))
    for label, vol in contrasts.items():
        panels.append((label, vol[z], "gray"))
    rows = math.ceil(len(panels) / _COLS)
    fig = Figure(figsize=(3.2 * _COLS, 3.4 * rows + 0.6), dpi=80)
    for i, (name, img, cmap) in enumerate(panels):
        ax = fig.add_subplot(rows, _COLS, i + 1)
        lo, hi = _window(np.asarray(img, dtype=np.float32))
        im = ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
        if cmap != "gray":
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    subtitle = ""
    if qa:
        parts = []
        if "self_nrmse" in qa:  # small by construction for a fitted input: a sanity check, not accuracy
            parts.append(f"self NRMSE {qa['self_nrmse']:.3f} (sanity only)")
        if (qa.get("fusion") or {}).get("gain_source"):
            parts.append(f"gains: {qa['fusion']['gain_source']}")
        if "te_pred_ms" in qa:
            parts.append(f"TE img/hdr {qa['te_pred_ms']:.0f}/{qa['te_header_ms']:g} ms")
        if "tr_pred_ms" in qa:
            parts.append(f"TR img/hdr {qa['tr_pred_ms']:.0f}/{qa['tr_header_ms']:g} ms")
        if qa.get("violations"):
            parts.append("QA: " + "; ".join(qa["violations"]))
        subtitle = "\n" + " | ".join(parts)
    fig.suptitle(title + subtitle, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".preview.", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
