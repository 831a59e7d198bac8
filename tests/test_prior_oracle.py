"""The two reference figures the model card sets beside a missed target (rtcontrast.research.prior_oracle)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from rtcontrast.research import phantom, prior_oracle
from rtcontrast.research.evaluate_se import _tissue, oracle_summary

PELVIS = {t: phantom.LABELS[t] for t in ("fat", "muscle", "prostate")}


def test_spearman_ceiling_is_what_a_calibrated_sd_scores() -> None:
    """Errors drawn exactly from N(0, sd^2) score the ceiling: the figure is a property of the sd's spread."""
    rng = np.random.default_rng(0)
    for spread in (0.1, 0.5, 1.5):  # sd of log sd
        sd = np.exp(rng.normal(np.log(0.2), spread, 20000))
        ceiling = prior_oracle.spearman_ceiling(sd, np.random.default_rng(1))
        calibrated = spearmanr(sd, np.abs(sd * rng.standard_normal(sd.size))).statistic
        assert ceiling == pytest.approx(calibrated, abs=0.03)
    narrow = prior_oracle.spearman_ceiling(np.exp(rng.normal(0, 0.1, 20000)), rng)
    wide = prior_oracle.spearman_ceiling(np.exp(rng.normal(0, 1.5, 20000)), rng)
    assert narrow < 0.15 < 0.7 < wide
    assert prior_oracle.spearman_ceiling(np.full(100, 0.3), rng) == 0.0


def test_oracle_knows_the_field_strength() -> None:
    """The generator's T1 rises with the field; an oracle that ignored the field (3 T answers for a 1.5 T subject)
    would be off by ~20 % on fat; the field-aware oracle is within the subject spread."""
    priors = prior_oracle.tissue_priors("in_domain_pelvis", PELVIS, n_per_field=3)
    fat = PELVIS["fat"]
    assert priors[3.0][fat][0] > 1.1 * priors[1.5][fat][0]
    subject = prior_oracle.pelvis_reference(prior_oracle.ORACLE_SEED_BASE + 1000, 1.5)
    right = _tissue([prior_oracle.oracle_maps(subject.labels, 1.5, priors)], [subject], PELVIS)
    wrong = _tissue([prior_oracle.oracle_maps(subject.labels, 3.0, priors)], [subject], PELVIS)
    assert right["fat"]["t1"] < 10.0 < wrong["fat"]["t1"]
    assert all(0 < v["t1"] < 60 and 0 < v["t2"] < 60 for v in right.values())


def test_oracle_answers_only_the_reported_tissues_at_the_nearest_field() -> None:
    labels = np.array([[[0, 1, 2], [2, 1, 0]]])
    priors = {1.5: {1: (300.0, 70.0), 2: (900.0, 40.0)}, 3.0: {1: (380.0, 68.0), 2: (1100.0, 35.0)}}
    m = prior_oracle.oracle_maps(labels, 2.9, priors)
    assert m.t1[0, 0, 1] == 380.0 and m.t2[0, 1, 0] == 35.0
    assert np.isnan(m.t1[0, 0, 0]) and np.isnan(m.t2[0, 1, 2])


def test_oracle_summary_counts_misses_the_prior_shares() -> None:
    """A network cell over the limit counts as prior-limited only where the oracle is over the limit too."""
    rows = {"T1w": {"network": {"tissues": {"fat": {"t1": 5.0, "t2": 14.0}, "muscle": {"t1": 12.0, "t2": 3.0}}}}}
    oracle = {"tissues": {"fat": {"t1": 6.0, "t2": 12.0}, "muscle": {"t1": 8.0, "t2": 9.0}}}
    s = oracle_summary(rows, oracle, 10.0)
    assert s["tissue_cells_missing_target"] == 2  # fat T2 14 %, muscle T1 12 %
    assert s["tissue_cells_missing_target_where_oracle_misses"] == 1  # fat T2: the prior alone is at 12 %
    assert s["tissue_cells_better_than_oracle"] == 2  # fat T1, muscle T2
    assert s["oracle_max_t2_pct"] == 12.0 and s["oracle_median_t1_pct"] == 7.0


def test_rendering_oracle_gives_the_input_back_and_the_prior_elsewhere() -> None:
    """PD is solved from the input at the case's own TE/TR: rendered there, the oracle returns the input exactly
    (a PD solved at any other timing would not); at another contrast it renders the prior's T1/T2, so it beats the
    constant floor on a pelvis T2w -> T1w render but is not the truth."""
    from rtcontrast.research.evaluate_se import ALL_TISSUES, _cross, floor_maps, pelvis_cases

    from rtcontrast.core.physics import signal, weighting

    priors = prior_oracle.tissue_priors("in_domain_pelvis", ALL_TISSUES["in_domain_pelvis"], n_per_field=3)
    assert phantom.LABELS["seminal_vesicle"] in priors[1.5]  # every tissue, not only the reported ones
    (case,) = pelvis_cases(1, 2, 120.0, 4500.0)
    m = prior_oracle.rendering_maps(case.image, case.labels, case.field_t, 120.0, 4500.0, priors)
    # where the prior's T1/T2 leave < 0.1 % of PD as signal (bone, gas at TE 120 ms) PD is bounded, not solved
    body = (case.labels > 0) & (weighting(120.0, 4500.0, m.t1, m.t2) >= prior_oracle.MIN_WEIGHTING)
    assert body.sum() > 0.9 * (case.labels > 0).sum()
    np.testing.assert_allclose(signal(m.pd, 120.0, 4500.0, m.t1, m.t2)[body], case.image[body], rtol=1e-4, atol=1e-3)
    assert np.all(np.isfinite(m.t1)) and np.all(m.t1 > 0) and np.all(np.isfinite(m.pd))
    oracle = _cross([m], [case], "T2w_120")["T1w_400"]
    floor = _cross([floor_maps(case)], [case], "T2w_120")["T1w_400"]
    assert floor["ssim"] < oracle["ssim"] < 0.99, (oracle, floor)


def test_oracle_summary_sets_the_rendering_beside_the_network() -> None:
    rows = {"T2w": {"network": {"tissues": {"fat": {"t1": 5.0, "t2": 4.0}},
                                "cross": {"T1w": {"ssim": 0.9, "psnr": 25.0}, "PDw": {"ssim": 0.7, "psnr": 20.0}}},
                    "oracle_cross": {"T1w": {"ssim": 0.8, "psnr": 22.0}, "PDw": {"ssim": 0.75, "psnr": 18.0}}}}
    s = oracle_summary(rows, {"tissues": {"fat": {"t1": 6.0, "t2": 5.0}}}, 10.0)
    assert s["oracle_min_cross_ssim"] == 0.75 and s["oracle_min_cross_psnr_db"] == 18.0
    assert s["cross_ssim_cells_better_than_oracle"] == 1
