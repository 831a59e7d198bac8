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
