"""Phantoms: deterministic from the seed, anatomically and physically plausible, varied."""

import numpy as np
from scipy import ndimage

from rtcontrast.research import phantom
from rtcontrast.research.phantom import LABELS


def test_deterministic() -> None:
    a = phantom.random_slice(123, (96, 96))
    b = phantom.random_slice(123, (96, 96))
    for k in ("pd", "t1", "t2", "labels"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    c = phantom.random_slice(124, (96, 96))
    assert not np.array_equal(a.labels, c.labels)


def test_tissue_values_in_literature_range() -> None:
    # 3 T and 1.5 T subjects: per-tissue medians inside broad literature bounds (ms)
    bounds = {"fat": ((200, 480), (50, 90)), "muscle": ((550, 1700), (20, 60)), "prostate": ((1000, 2000), (45, 120)),
              "urine": ((1800, 5500), (500, 2600)), "marrow": ((300, 800), (35, 70))}
    for field in (1.5, 3.0):
        for seed in range(4):
            m = phantom.render_slice(phantom.make_subject(seed, field), 0.0, (128, 128), (3.0, 3.0))
            assert m.t1.max() <= 10000 and m.t2.max() <= 5000
            assert (m.pd >= 0).all() and (m.pd <= 1.2).all()
            outside = ndimage.binary_erosion(m.labels == 0, iterations=2)  # partial volume at the edge
            assert (m.pd[outside] == 0).all()
            for tissue, ((t1lo, t1hi), (t2lo, t2hi)) in bounds.items():
                sel = m.labels == LABELS[tissue]
                if sel.sum() < 5:
                    continue
                assert t1lo <= np.median(m.t1[sel]) <= t1hi, (tissue, field, seed)
                assert t2lo <= np.median(m.t2[sel]) <= t2hi, (tissue, field, seed)


def test_t1_longer_at_3t() -> None:
    s15 = phantom.make_subject(7, 1.5)
    s3 = phantom.make_subject(7, 3.0)
    assert s3.values["prostate"][1] > s15.values["prostate"][1]


def test_anatomy_present_and_varied() -> None:
    areas = []
    for seed in range(6):
        maps, _ = phantom.volume(seed, n_slices=5, shape=(128, 128), pixel_mm=3.5, slice_mm=10)
        present = set(np.unique(maps.labels).tolist())
        for tissue in ("fat", "muscle", "cortical_bone", "marrow", "prostate", "rectal_wall"):
            assert LABELS[tissue] in present, (seed, tissue)
        areas.append((maps.labels > 0).sum())
    assert np.std(areas) / np.mean(areas) > 0.05  # body sizes differ


def test_acquisition_noise_and_bias() -> None:
    m = phantom.random_slice(5, (96, 96))
    rng = np.random.default_rng(0)
    a = phantom.acquire(m, 80.0, 3000.0, rng, snr=50.0, bias_strength=0.2, gain=1000.0)
    assert a.image.shape == m.pd.shape and (a.image >= 0).all()
    bg = a.image[m.labels == 0]
    assert bg.mean() > 0  # Rician floor
    assert 0.5 < a.bias.min() and a.bias.max() < 2.0 and a.bias.std() > 0
