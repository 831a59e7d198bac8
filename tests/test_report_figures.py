"""Report figures a researcher can read (#16): colour bars, log axes whose labels do not
overlap, Bland-Altman limits only from enough points."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from rtcontrast.core.maps import QMaps
from rtcontrast.research import report


def _points(n: int, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    true1, true2 = rng.uniform(300, 3000, n), rng.uniform(40, 250, n)
    return {"muscle": {"t1_true": true1, "t1_pred": true1 * rng.normal(1.0, 0.1, n),
                       "t2_true": true2, "t2_pred": true2 * rng.normal(1.05, 0.1, n)}}


def _dashed(ax: Any) -> int:
    return sum(1 for ln in ax.get_lines() if ln.get_linestyle() == "--")


def test_bland_altman_limits_need_enough_points() -> None:
    few = report.bland_altman_stats(_points(3))["muscle"]["t1"]
    assert few["n"] == 3 and few["loa_low_pct"] is None and few["loa_high_pct"] is None
    assert report._loa_text(few) == f"n < {report.MIN_BA_POINTS}"
    many = report.bland_altman_stats(_points(report.MIN_BA_POINTS))["muscle"]["t1"]
    assert many["loa_low_pct"] is not None and many["loa_low_pct"] < many["bias_pct"] < many["loa_high_pct"]
    plt = report._plt()
    fig = report.bland_altman_figure(_points(3), "few")
    assert [_dashed(ax) for ax in fig.axes] == [0, 0]
    assert all(any("no limits of agreement" in t.get_text() for t in ax.texts) for ax in fig.axes)
    plt.close(fig)
    fig = report.bland_altman_figure(_points(12), "many")
    assert [_dashed(ax) for ax in fig.axes] == [2, 2]
    plt.close(fig)


def _overlaps(fig: Any, axis: Any) -> list[tuple[str, str]]:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    lo, hi = sorted(axis.get_view_interval())
    labels = [(t.get_text(), t.get_window_extent(renderer)) for t, loc in
              zip(axis.get_majorticklabels() + axis.get_minorticklabels(),
                  list(axis.get_majorticklocs()) + list(axis.get_minorticklocs()))
              if t.get_visible() and t.get_text() and lo <= loc <= hi]
    out = []
    for i, (ta, a) in enumerate(labels):
        for tb, b in labels[i + 1:]:
            if a.overlaps(b):
                out.append((ta, tb))
    return out


def test_identification_axes_are_readable() -> None:
    rows = [{"series_uid": f"1.2.3.{i}", "te": te, "tr": tr, "te_id": te * 1.1, "tr_id": tr * 0.9,
             "te_id_slices": [te * 1.05, te * 1.2], "tr_id_slices": [tr * 0.85, tr * 0.95], "self_nrmse": 0.02}
            for i, (te, tr) in enumerate([(8, 400), (12, 600), (75, 4500), (120, 4500), (100, 3000)])]
    fig = report.identification_figure(rows)
    for ax in fig.axes[:2]:
        for axis in (ax.xaxis, ax.yaxis):
            texts = [t.get_text() for t in axis.get_majorticklabels() if t.get_text()]
            assert texts and all("$" not in t for t in texts), texts  # plain numbers, not 2x10^2
            assert _overlaps(fig, axis) == []
    report._plt().close(fig)


def test_real_example_has_a_colour_bar_per_image() -> None:
    rng = np.random.default_rng(1)
    shape = (3, 32, 32)
    pixels = rng.uniform(0, 1000, shape).astype(np.float32)
    maps = QMaps(pd=pixels * 1.2, t1=np.full(shape, 1200, np.float32), t2=np.full(shape, 90, np.float32),
                 te_tr_pred=np.tile([[80.0, 4000.0]], (3, 1)).astype(np.float32), scale=1000.0)
    fig = report.real_example_figure(pixels, maps, 80.0, 4000.0, "series …123")
    images = [ax for ax in fig.axes if ax.get_images()]
    bars = [ax for ax in fig.axes if not ax.get_images()]
    assert len(images) == 8 and len(bars) == len(images)
    assert {"ms", "difference (input units)"} <= {b.get_ylabel() for b in bars}
    report._plt().close(fig)


@pytest.mark.parametrize("n", [1, 2])
def test_tiny_samples_in_the_table(n: int) -> None:
    stats = report.bland_altman_stats(_points(n))
    assert stats["muscle"]["t2"]["loa_high_pct"] is None
