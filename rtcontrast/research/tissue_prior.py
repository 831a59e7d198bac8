"""A broad joint prior of (PD, T1, T2) over human tissue at any field strength (training only).

Why: a network trained on one phantom's few tissue values learns *where* things are, not
what a spin-echo contrast says about a voxel.  Drawing every class of a random-geometry
phantom from this prior (:mod:`rtcontrast.research.random_phantom`) makes position and shape
useless as cues, so the network has to read relaxation from intensity, TE/TR and field.

Values are literature means at 1.5 T and 3.0 T (seed-paper.md: de Bazelaire 2004,
Stanisz 2005; brain and abdomen values of the same surveys) with log-normal spreads that
are wider than any one study's, because sites, sequences and subjects differ.  T1 is
interpolated between the two anchors as a power law of the field (T1 ~ B0^a), T2 the same
way; any field in [1.0, 3.0] T gets a value.  A share of classes (``p_free``) draws from a
wide box instead (T1 200-4500 ms, T2 15-2000 ms, T2 < T1), so that no intensity maps to a
fixed tissue.  numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TissueClass:
    """Literature anchors of one tissue: PD (relative to water) and T1/T2 (ms) at 1.5 and 3 T."""

    pd: float
    t1_15: float
    t1_30: float
    t2_15: float
    t2_30: float
    #: relative (log-normal) spread of T1, T2 and PD between subjects and sites
    sd_t1: float = 0.10
    sd_t2: float = 0.12
    sd_pd: float = 0.06


#: Tissue -> anchors.  Cortical bone and air give (almost) no signal.
TISSUES: dict[str, TissueClass] = {
    "fat": TissueClass(0.90, 260.0, 380.0, 80.0, 68.0, 0.10, 0.12),
    "muscle": TissueClass(0.72, 870.0, 1200.0, 45.0, 36.0, 0.12, 0.15),
    "glandular": TissueClass(0.82, 1300.0, 1600.0, 90.0, 74.0, 0.12, 0.18),
    "grey_matter": TissueClass(0.82, 1100.0, 1550.0, 95.0, 85.0, 0.08, 0.10),
    "white_matter": TissueClass(0.70, 650.0, 900.0, 75.0, 70.0, 0.08, 0.10),
    "csf": TissueClass(1.00, 4000.0, 4300.0, 2000.0, 1800.0, 0.10, 0.25, 0.03),
    "urine": TissueClass(0.98, 3000.0, 3500.0, 1200.0, 1100.0, 0.15, 0.35, 0.03),
    "cyst": TissueClass(0.95, 2500.0, 3000.0, 600.0, 550.0, 0.20, 0.40, 0.05),
    "blood": TissueClass(0.85, 1450.0, 1900.0, 250.0, 200.0, 0.10, 0.30),
    "marrow": TissueClass(0.80, 500.0, 590.0, 50.0, 49.0, 0.15, 0.12),
    "liver": TissueClass(0.70, 580.0, 810.0, 45.0, 34.0, 0.12, 0.15),
    "kidney": TissueClass(0.82, 960.0, 1140.0, 85.0, 76.0, 0.15, 0.15),
    "spleen": TissueClass(0.80, 1060.0, 1330.0, 70.0, 61.0, 0.10, 0.15),
    "cortical_bone": TissueClass(0.04, 250.0, 300.0, 2.0, 1.8, 0.20, 0.30, 0.40),
    "air": TissueClass(0.0, 0.0, 0.0, 0.0, 0.0),
}
#: Tissues with signal that random classes draw from (air and bone get their own share).
SOFT_TISSUES: tuple[str, ...] = tuple(k for k in TISSUES if k not in ("air", "cortical_bone"))
#: The wide box of "free" classes (ms).
FREE_T1_MS = (200.0, 4500.0)
FREE_T2_MS = (15.0, 2000.0)


def anchors_at(name: str, field_t: float) -> tuple[float, float, float]:
    """Mean (PD, T1, T2) of ``name`` at ``field_t`` tesla (power law through the 1.5/3 T anchors)."""
    c = TISSUES[name]
    if c.pd == 0.0:
        return 0.0, 0.0, 0.0
    x = np.log(field_t / 1.5) / np.log(2.0)  # 0 at 1.5 T, 1 at 3 T
    t1 = c.t1_15 * (c.t1_30 / c.t1_15) ** x
    t2 = c.t2_15 * (c.t2_30 / c.t2_15) ** x
    return c.pd, float(t1), float(t2)


def draw(name: str, field_t: float, rng: np.random.Generator, widen: float = 1.0) -> tuple[float, float, float]:
    """One subject's (PD, T1, T2) of tissue ``name`` at ``field_t`` (log-normal around the anchors)."""
    c = TISSUES[name]
    pd, t1, t2 = anchors_at(name, field_t)
    if pd == 0.0:
        return 0.0, 0.0, 0.0
    pd = float(np.clip(pd * np.exp(rng.normal(0, c.sd_pd * widen)), 0.01, 1.0))
    t1 = float(t1 * np.exp(rng.normal(0, c.sd_t1 * widen)))
    t2 = float(min(t2 * np.exp(rng.normal(0, c.sd_t2 * widen)), 0.9 * t1))
    return pd, t1, t2


def draw_free(rng: np.random.Generator) -> tuple[float, float, float]:
    """A class with no tissue name: log-uniform T1 and T2 in the wide box, T2 < T1/2."""
    t1 = float(np.exp(rng.uniform(*np.log(FREE_T1_MS))))
    hi = min(FREE_T2_MS[1], 0.5 * t1)
    t2 = float(np.exp(rng.uniform(np.log(FREE_T2_MS[0]), np.log(hi))))
    return float(rng.uniform(0.5, 1.0)), t1, t2


def draw_class(field_t: float, rng: np.random.Generator, p_free: float = 0.25, p_bone: float = 0.05,
               p_air: float = 0.03) -> tuple[str, tuple[float, float, float]]:
    """A random class for a random-geometry phantom: (tissue name or 'free', (PD, T1, T2))."""
    u = rng.random()
    if u < p_air:
        return "air", (0.0, 0.0, 0.0)
    if u < p_air + p_bone:
        return "cortical_bone", draw("cortical_bone", field_t, rng)
    if u < p_air + p_bone + p_free:
        return "free", draw_free(rng)
    name = SOFT_TISSUES[int(rng.integers(len(SOFT_TISSUES)))]
    return name, draw(name, field_t, rng, widen=1.5)


def random_field(rng: np.random.Generator) -> float:
    """A field strength for training: 1.5 or 3 T mostly, sometimes anything in [1.0, 3.0] T."""
    if rng.random() < 0.2:
        return float(rng.uniform(1.0, 3.0))
    return 1.5 if rng.random() < 0.5 else 3.0
