"""Pins on the numbers a planner's image is made of: the signal equation in ``render``, the
uint16 conversion, the display window, the QA residual, the series scale and PD's units.

Every expected value here is computed independently of the code under test: from
``math.exp`` on hand-picked tissue values, from textbook percentiles of small integer
ranges, or from the model contract (``image = stored / s``, ``pd`` in the units of the
input).  Each test names the mutation it was written against (issue #17); it was checked
once by applying that mutation by hand and seeing the test fail.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from rtcontrast.core.contract import series_scale
from rtcontrast.core.inference import QMapModel
from rtcontrast.core.maps import QMaps
from rtcontrast.core.physics import signal, weighting
from rtcontrast.core.render import Window, render, self_nrmse, to_uint16, window_from_percentiles
from tests.support import phantom_image

#: (PD, T1 ms, T2 ms) of four tissues at 1.5 T, and background (all zero).
TISSUES = [(0.9, 260.0, 60.0), (0.7, 870.0, 47.0), (1.0, 2400.0, 1200.0), (0.8, 1300.0, 90.0), (0.0, 0.0, 0.0)]


def _maps(scale: float = 1.0) -> QMaps:
    pd, t1, t2 = (np.array([[[t[i] for t in TISSUES]]], np.float32) for i in range(3))
    return QMaps(pd=pd * np.float32(scale), t1=t1, t2=t2, te_tr_pred=np.zeros((1, 2), np.float32), scale=scale)


def _hand(te: float, tr: float, scale: float = 1.0) -> list[float]:
    return [scale * pd * (1 - math.exp(-tr / t1)) * math.exp(-te / t2) if pd else 0.0 for pd, t1, t2 in TISSUES]


# ----------------------------------------------------------------------------- render


@pytest.mark.parametrize(("te", "tr"), [(20.0, 600.0), (100.0, 4000.0), (8.0, 400.0), (120.0, 300.0)])
def test_render_is_the_signal_equation_with_te_and_tr_in_their_places(te: float, tr: float) -> None:
    """Guards: TE and TR swapped in ``render`` (or in ``physics.signal``), a wrong sign or a
    T1/T2 swap in an exponent.  TE != TR in every case, so a swap changes every tissue."""
    got = render(_maps(scale=1000.0), te, tr)
    assert got.dtype == np.float32 and got.shape == (1, 1, len(TISSUES))
    np.testing.assert_allclose(got[0, 0], _hand(te, tr, 1000.0), rtol=2e-6, atol=1e-4)


def test_signal_and_weighting_hand_values_at_unequal_te_tr() -> None:
    """Guards: the equation itself (PD * (1 - e^(-TR/T1)) * e^(-TE/T2)) in both entry points."""
    # T1w 15/500 of muscle (T1 870, T2 47): (1 - e^-(500/870)) * e^-(15/47)
    e = (1 - math.exp(-500 / 870)) * math.exp(-15 / 47)
    assert weighting(15.0, 500.0, 870.0, 47.0) == pytest.approx(e, rel=1e-6)
    assert signal(0.7, 15.0, 500.0, 870.0, 47.0) == pytest.approx(0.7 * e, rel=1e-6)
    assert e == pytest.approx(0.31769, abs=1e-4)  # the number itself, for a reader checking by hand


def test_contrast_order_of_tissues() -> None:
    """Guards the clinical meaning: fat is brighter than fluid on T1w, fluid brighter than fat on T2w."""
    t1w = render(_maps(), 10.0, 500.0)[0, 0]
    t2w = render(_maps(), 100.0, 4000.0)[0, 0]
    fat, fluid = 0, 2
    assert t1w[fat] > 2 * t1w[fluid]
    assert t2w[fluid] > 3 * t2w[fat]


def test_to_uint16_rounds_to_nearest_and_clips() -> None:
    """Guards: truncation instead of rounding, lost clipping (negative values wrapping to 65535)."""
    got = to_uint16(np.array([-3.0, 0.4, 0.6, 1.4999, 1.6, 2.5, 1234.5001, 65535.4, 70000.0], np.float32))
    assert got.dtype == np.uint16
    assert got.tolist() == [0, 0, 1, 1, 2, 2, 1235, 65535, 65535]


# ----------------------------------------------------------------------------- window


def test_window_from_percentiles_hand_values() -> None:
    """Guards: which percentiles span the window, zeros (background) excluded, centre = lo + width/2."""
    px = np.arange(0, 1001, dtype=np.uint16)  # non-zero voxels 1..1000
    w = window_from_percentiles(px)
    # numpy 'linear': p1 = 1 + 0.01 * 999 = 10.99; p99.5 = 1 + 0.995 * 999 = 995.005
    assert w.width == pytest.approx(995.005 - 10.99, abs=1e-6)
    assert w.center == pytest.approx(10.99 + (995.005 - 10.99) / 2, abs=1e-6)
    assert w.center == pytest.approx(502.9975, abs=1e-6)
    # many zeros (air) do not drag the window down
    padded = np.concatenate([np.zeros(100_000, np.uint16), px[1:]])
    assert window_from_percentiles(padded) == w


def test_window_degenerate_cases() -> None:
    """Guards: the floor of 1 on the width and the empty-image window (a TPS divides by the width)."""
    assert window_from_percentiles(np.zeros((2, 3, 3), np.uint16)) == Window(center=0.5, width=1.0)
    assert window_from_percentiles(np.full((2, 3, 3), 7, np.uint16)) == Window(center=7.5, width=1.0)


# ----------------------------------------------------------------------------- QA residual


def test_self_nrmse_equals_a_known_residual() -> None:
    """Guards: the self-NRMSE figure QA compares with its threshold (normalised by the series
    scale, over the body only, a root of the mean square)."""
    scale = 400.0
    maps = _maps(scale)
    exact = render(maps, 90.0, 4000.0)
    assert self_nrmse(maps, exact, 90.0, 4000.0) == pytest.approx(0.0, abs=1e-6)
    body = exact > 0.05 * scale
    off = exact + np.where(body, 12.0, 0.0).astype(np.float32)  # 12 units off in every body voxel
    assert self_nrmse(maps, off, 90.0, 4000.0) == pytest.approx(12.0 / scale, rel=1e-4)
    # a residual of alternating sign has the same RMS
    alt = exact + np.where(body, np.array([12.0, -12.0] * 3)[: exact.shape[-1]], 0.0).astype(np.float32)
    assert self_nrmse(maps, alt, 90.0, 4000.0) == pytest.approx(12.0 / scale, rel=1e-4)


def test_self_nrmse_blocks_do_not_change_the_figure() -> None:
    """Guards: the slice-block accumulation (a block lost or counted twice changes the mean)."""
    rng = np.random.default_rng(1)
    n = 7
    maps = QMaps(pd=rng.uniform(100, 900, (n, 4, 5)).astype(np.float32), t1=rng.uniform(300, 3000, (n, 4, 5)).astype(np.float32),
                 t2=rng.uniform(30, 300, (n, 4, 5)).astype(np.float32), te_tr_pred=np.zeros((n, 2), np.float32), scale=500.0)
    px = render(maps, 80.0, 3000.0) + rng.normal(0, 10, (n, 4, 5)).astype(np.float32)
    ref = self_nrmse(maps, px, 80.0, 3000.0, block_slices=n)
    err = (render(maps, 80.0, 3000.0) - px).astype(np.float64)[px > 25.0]
    assert ref == pytest.approx(math.sqrt(float(np.mean(err**2))) / 500.0, rel=1e-5)
    for b in (1, 2, 3):
        assert self_nrmse(maps, px, 80.0, 3000.0, block_slices=b) == pytest.approx(ref, rel=1e-6)


# ----------------------------------------------------------------------------- series scale


def test_series_scale_is_the_percentile_of_positive_voxels() -> None:
    """Guards: the series-scale definition of the qmap contract (zeros excluded, the given percentile)."""
    v = np.concatenate([np.zeros(500), np.arange(1, 101)]).astype(np.float32)
    assert series_scale(v, 99.0) == pytest.approx(1 + 0.99 * 99)  # 99.01
    assert series_scale(v, 50.0) == pytest.approx(50.5)
    assert series_scale(np.zeros(10), 99.0) == 1.0
    assert series_scale(-np.ones(10), 99.0) == 1.0


def test_model_uses_its_input_percentile_for_the_series_scale(model: QMapModel) -> None:
    """Guards: the series scale taken at a fixed percentile (e.g. the 50th) instead of the
    model's ``input_percentile`` (99 for the shipped model, per its card)."""
    assert model.info.input_percentile == 99.0
    img = phantom_image(4, 64, 90.0, 4000.0)
    maps = model.predict(img, 90.0, 4000.0)
    pos = img[img > 0].astype(np.float64)
    assert maps.scale == pytest.approx(float(np.percentile(pos, 99.0)), rel=1e-6)
    assert maps.scale > 1.5 * float(np.median(pos))  # the 50th would be far off


def test_network_input_is_stored_values_over_the_series_scale(model: QMapModel) -> None:
    """Guards: the normalisation of the contract and PD's un-scaling: ``predict`` must equal a
    hand-normalised ``session.run`` whose PD is multiplied back by s (``image = stored / s``;
    ``pd`` in the input's units)."""
    img = phantom_image(4, 64, 90.0, 4000.0)
    s = float(np.percentile(img[img > 0], 99.0))
    x = np.zeros((4, 1, 64, 64), np.float32)
    x[:, 0] = img / np.float32(s)
    raw = model.run_normalised(x, np.tile(np.float32([90.0, 4000.0]), (4, 1)))
    maps = model.predict(img, 90.0, 4000.0)
    np.testing.assert_allclose(maps.pd, raw["pd"][:, 0] * s, rtol=1e-4, atol=1e-3 * s)
    np.testing.assert_allclose(maps.t1, raw["t1"][:, 0], rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(maps.t2, raw["t2"][:, 0], rtol=1e-4, atol=1e-2)


def test_pd_is_in_the_input_units(model: QMapModel) -> None:
    """Guards: PD not multiplied back by the series scale (derived images almost black).

    Property: re-rendering the input's own TE/TR from the maps gives the input (the model
    card's self-NRMSE target is 0.02 at 256x256; 0.05 here at 64x64), and multiplying the
    input by k multiplies PD (and only PD) by k."""
    img = phantom_image(4, 64, 90.0, 4000.0)
    maps = model.predict(img, 90.0, 4000.0)
    body = img > 0.05 * maps.scale
    again = render(maps, 90.0, 4000.0)
    assert float(np.median(again[body] / img[body])) == pytest.approx(1.0, abs=0.05)
    assert self_nrmse(maps, img, 90.0, 4000.0) < 0.05
    k = 3.0
    scaled = model.predict(img * np.float32(k), 90.0, 4000.0)
    assert scaled.scale == pytest.approx(k * maps.scale, rel=1e-5)
    np.testing.assert_allclose(scaled.pd, k * maps.pd, rtol=1e-3, atol=1e-3 * maps.scale)
    np.testing.assert_allclose(scaled.t1, maps.t1, rtol=1e-3, atol=0.5)


def test_padding_and_batching_do_not_change_the_maps(model: QMapModel) -> None:
    """Guards: padding/cropping offsets and batch bookkeeping (a slice mapped to another's output)."""
    img = phantom_image(4, 64, 90.0, 4000.0)[:, 3:61, 5:60]  # 58x55: padded to 64x64
    whole = model.predict(img, 90.0, 4000.0, batch_size=8)
    one = model.predict(img, 90.0, 4000.0, batch_size=1)
    assert whole.pd.shape == img.shape
    np.testing.assert_allclose(one.pd, whole.pd, rtol=1e-4, atol=1e-3 * whole.scale)
    flipped = model.predict(img[::-1].copy(), 90.0, 4000.0, batch_size=3)  # same voxels, slices reversed
    np.testing.assert_allclose(flipped.pd[::-1], whole.pd, rtol=1e-4, atol=1e-3 * whole.scale)


def test_self_nrmse_skips_empty_blocks_and_counts_every_body_voxel() -> None:
    """Guards: a block without body (the first slices of a stack are often air) ending the
    accumulation instead of being skipped, and the empty-body / single-voxel edge cases."""
    scale = 400.0
    rng = np.random.default_rng(2)
    n = 6
    pd = rng.uniform(100, 900, (n, 3, 3)).astype(np.float32)
    pd[:2] = 0.0  # two slices of air first
    maps = QMaps(pd=pd, t1=np.full((n, 3, 3), 900.0, np.float32), t2=np.full((n, 3, 3), 80.0, np.float32),
                 te_tr_pred=np.zeros((n, 2), np.float32), scale=scale)
    exact = render(maps, 90.0, 4000.0)
    off = np.where(exact > 0.05 * scale, exact + 8.0, exact).astype(np.float32)
    for b in (1, 2, 16):
        assert self_nrmse(maps, off, 90.0, 4000.0, block_slices=b) == pytest.approx(8.0 / scale, rel=1e-4)
    # one body voxel only: its own error
    single = np.zeros_like(exact)
    single[4, 1, 1] = exact[4, 1, 1] + 20.0
    assert self_nrmse(maps, single, 90.0, 4000.0, block_slices=1) == pytest.approx(
        abs(float(single[4, 1, 1] - exact[4, 1, 1])) / scale, rel=1e-4)
    assert self_nrmse(maps, np.zeros_like(exact), 90.0, 4000.0) == 0.0


# ----------------------------------------------------------------------------- contract metadata

_META = {"rtcontrast.contract": "qmap/1", "name": "m", "version": "1", "input_percentile": "99.0",
         "spatial_multiple": "16", "te_range_ms": "8,150", "tr_range_ms": "300,6000", "field_strengths_t": "1.5,3"}


def test_contract_metadata_parsed_exactly() -> None:
    """Guards: the numbers the node takes from a model file (percentile, multiple, ranges)."""
    from rtcontrast.core.contract import parse_metadata

    info = parse_metadata(dict(_META))
    assert (info.input_percentile, info.spatial_multiple) == (99.0, 16)
    assert (info.te_range_ms, info.tr_range_ms, info.field_strengths_t) == ((8.0, 150.0), (300.0, 6000.0), (1.5, 3.0))
    assert (info.contract, info.max_inputs, info.fusion) == ("qmap/1", 1, False)
    two = parse_metadata({**_META, "rtcontrast.contract": "qmap/2", "max_inputs": "3"})
    assert (two.max_inputs, two.fusion) == (3, True)
    assert parse_metadata({**_META, "rtcontrast.contract": "qmap/2", "max_inputs": "1"}).max_inputs == 1
    # the lowest legal values are accepted (bounds are exactly those of the contract)
    assert parse_metadata({**_META, "spatial_multiple": "1"}).spatial_multiple == 1
    assert parse_metadata({**_META, "input_percentile": "0.5"}).input_percentile == 0.5


@pytest.mark.parametrize(("change", "message"), [
    ({"input_percentile": None, "te_range_ms": None}, "lacks input_percentile, te_range_ms"),
    ({"te_range_ms": "150"}, "'te_range_ms' must be 'low,high' in ms, got '150'"),
    ({"tr_range_ms": "300,300"}, "'tr_range_ms' must have low < high"),
    ({"tr_range_ms": "6000,300"}, "'tr_range_ms' must have low < high"),
    ({"input_percentile": "0"}, "input_percentile must be in (0, 100]"),
    ({"input_percentile": "100.5"}, "input_percentile must be in (0, 100]"),
    ({"spatial_multiple": "0"}, "spatial_multiple must be >= 1"),
    ({"spatial_multiple": "x"}, "malformed number"),
    ({"rtcontrast.contract": "qmap/9"}, "declares contract 'qmap/9'; this node knows 'qmap/1' and 'qmap/2'"),
    ({"rtcontrast.contract": "qmap/2"}, "needs an integer 'max_inputs'"),
    ({"rtcontrast.contract": "qmap/2", "max_inputs": "0"}, "max_inputs must be >= 1"),
])
def test_contract_metadata_refusals_say_what(change: dict[str, str | None], message: str) -> None:
    """Guards: a model whose metadata the node would misread is refused, with the reason."""
    from rtcontrast.core.contract import ContractError, parse_metadata

    meta = {k: v for k, v in {**_META, **change}.items() if v is not None}
    with pytest.raises(ContractError) as info:
        parse_metadata(meta)
    assert message in str(info.value), str(info.value)
    assert parse_metadata({**_META, "input_percentile": "100"}).input_percentile == 100.0  # inclusive upper end


def test_pad_amounts_reach_the_next_multiple() -> None:
    """Guards: padding to the model's multiple (under-padding crashes, over-padding shifts nothing
    but wastes memory; both pinned)."""
    from rtcontrast.core.contract import pad_amounts

    assert pad_amounts(64, 64, 16) == (0, 0)
    assert pad_amounts(58, 55, 16) == (6, 9)
    assert pad_amounts(1, 17, 16) == (15, 15)
    assert pad_amounts(7, 9, 1) == (0, 0)


def test_predict_refuses_what_it_cannot_map(model: QMapModel) -> None:
    """Guards: the input checks of ``predict_multi`` (each bad call an error that says what)."""
    img = phantom_image(2, 64, 90.0, 4000.0)
    with pytest.raises(ValueError, match="^no input series$"):
        model.predict_multi([])
    with pytest.raises(ValueError, match="^2 input series, model qmap-pelvis takes at most 1$"):
        model.predict_multi([(img, 90.0, 4000.0), (img, 10.0, 500.0)])
    with pytest.raises(ValueError, match=r"^pixels must be \[N,H,W\], got shape \(64, 64\)$"):
        model.predict(img[0], 90.0, 4000.0)


def test_fusion_inputs_must_share_the_grid() -> None:
    """Guards: a partner series on another grid fed to a qmap/2 model (its voxels would be
    read as the target's)."""
    from tests.support import REPO

    fusion = QMapModel(REPO / "models" / "qmap-pelvis-fusion.onnx", "cpu")
    img = phantom_image(2, 64, 90.0, 4000.0)
    with pytest.raises(ValueError, match=r"^input series shapes differ: \(2, 64, 48\) vs \(2, 64, 64\)$"):
        fusion.predict_multi([(img, 90.0, 4000.0), (img[:, :, :48].copy(), 10.0, 500.0)])
    with pytest.raises(ValueError, match="input series shapes differ"):
        fusion.predict_multi([(img, 90.0, 4000.0), (img, 10.0, 500.0), (img[:1].copy(), 8.0, 4500.0)])


def test_weighting_keeps_the_precision_it_is_given() -> None:
    """Guards: the dtype rule of the numpy path: float32 maps render in float32 (a 512x512x200
    series would double its memory in float64), float64 inputs stay float64 (exact to 1e-12)."""
    t1, t2 = np.array([870.0, 2400.0]), np.array([47.0, 1200.0])
    e64 = weighting(15.0, 500.0, t1, t2)
    assert e64.dtype == np.float64
    np.testing.assert_allclose(e64, [(1 - math.exp(-500 / 870)) * math.exp(-15 / 47),
                                     (1 - math.exp(-500 / 2400)) * math.exp(-15 / 1200)], rtol=1e-12)
    te32, tr32 = np.float32(15.0), np.float32(500.0)  # as render passes them
    assert weighting(te32, tr32, t1.astype(np.float32), t2.astype(np.float32)).dtype == np.float32
    assert weighting(te32, tr32, t1.astype(np.float32), t2).dtype == np.float32  # T2 follows T1
    assert render(_maps(), 90.0, 4000.0).dtype == np.float32
