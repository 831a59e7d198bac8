"""The maps of one series: PD, T1, T2 and what the model read from the image.

A plain numpy container, kept apart from the onnxruntime runner so that rendering,
derivation and evaluation can use maps without loading an inference engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class QMaps:
    """Maps of one series, [N,H,W] float32, in the series' stored-value units (PD) and ms."""

    pd: np.ndarray
    t1: np.ndarray
    t2: np.ndarray
    te_tr_pred: np.ndarray  # [N,2] ms, identified per slice
    scale: float  # the series scale s used for the model input
    #: with data consistency: each input's gain relative to the first (estimated once for the volume)
    input_gains: list[float] | None = None
    #: qmap/3 models that export uncertainty: sd of ln T1 and ln T2, sd of PD (stored-value units); else None
    t1_log_sd: np.ndarray | None = None
    t2_log_sd: np.ndarray | None = None
    pd_sd: np.ndarray | None = None
    #: qmap/3: the field strength (T) given to the model, and whether it was assumed (header had none)
    field_t: float | None = None
    field_t_assumed: bool = False
    #: with data consistency: the fusion QA figures (rtcontrast.core.fusion; gains' source, misfit per input, bounds)
    fusion: dict | None = None
