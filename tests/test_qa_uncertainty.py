"""QA from the model's own uncertainty (qmap/3): a series the model cannot read is held.

The figures come from the maps (median relative sd over the body); the protocol's limits
decide; ``uncertainty_action`` (default ``hold``) overrides a milder ``action``.  A model
without uncertainty outputs produces no figures and never triggers these checks.
"""

from __future__ import annotations

import numpy as np
import pytest

from rtcontrast.core.maps import QMaps
from rtcontrast.node.qa import compute_qa, qa_action, qa_violations, uncertainty_limit, uncertainty_violations
from rtcontrast.settings.protocol import ProtocolConfig


def maps_with_sd(t1_rel: float, t2_rel: float, pd_rel: float, with_sd: bool = True) -> tuple[QMaps, np.ndarray]:
    """A 2-slice phantom: a disc of tissue in air, the model's sd set to the given relative values."""
    n, h, w = 2, 32, 32
    yy, xx = np.mgrid[:h, :w]
    body = ((yy - 16) ** 2 + (xx - 16) ** 2) < 12**2
    pd = np.where(body, 1000.0, 0.0).astype(np.float32)[None].repeat(n, 0)
    t1 = np.full((n, h, w), 1200.0, np.float32)
    t2 = np.full((n, h, w), 90.0, np.float32)
    te, tr = 90.0, 4000.0
    pixels = pd * (1 - np.exp(-tr / t1)) * np.exp(-te / t2)
    sd = {}
    if with_sd:
        sd = {"t1_log_sd": np.full_like(pd, np.log1p(t1_rel)), "t2_log_sd": np.full_like(pd, np.log1p(t2_rel)),
              "pd_sd": pd * np.float32(pd_rel)}
    maps = QMaps(pd=pd, t1=t1, t2=t2, te_tr_pred=np.tile([te, tr], (n, 1)).astype(np.float32),
                 scale=float(np.percentile(pixels[pixels > 0], 99)), **sd)
    return maps, pixels


def test_confident_maps_pass_and_uncertain_maps_are_held_by_default() -> None:
    proto = ProtocolConfig()  # action warn, uncertainty_action hold, limits unset: 35 % for a model without its own
    good, px = maps_with_sd(0.10, 0.12, 0.08)
    qa = compute_qa(good, px, 90.0, 4000.0)
    assert qa["uncertainty"]["t1_rel_sd"] == pytest.approx(0.10, abs=1e-3)
    assert uncertainty_violations(qa, proto) == []
    assert qa_action(qa_violations(qa, proto), [], proto) == "none"

    bad, px = maps_with_sd(0.62, 0.20, 0.08)  # T1 a guess: ±62 %
    qa = compute_qa(bad, px, 90.0, 4000.0)
    unc = uncertainty_violations(qa, proto)
    assert len(unc) == 1 and "median T1 ±62 % in the body; limit 35 %" in unc[0], unc
    violations = qa_violations(qa, proto)
    assert unc[0] in violations
    assert qa_action(violations, unc, proto) == "hold"  # stricter than the protocol's "warn"


def test_uncertainty_action_and_limits_come_from_the_protocol() -> None:
    bad, px = maps_with_sd(0.62, 0.50, 0.40)
    qa = compute_qa(bad, px, 90.0, 4000.0)
    warn_only = ProtocolConfig.model_validate({"qa": {"uncertainty_action": "warn"}})
    assert qa_action(qa_violations(qa, warn_only), uncertainty_violations(qa, warn_only), warn_only) == "warn"
    lenient = ProtocolConfig.model_validate({"qa": {"max_t1_uncertainty": 0.7, "max_t2_uncertainty": 0.7,
                                                    "max_pd_uncertainty": 0.7}})
    assert uncertainty_violations(qa, lenient) == []
    # a protocol-wide hold stays a hold even when uncertainty alone would only warn
    strict = ProtocolConfig.model_validate({"qa": {"action": "hold", "uncertainty_action": "warn"}})
    assert qa_action(qa_violations(qa, strict), uncertainty_violations(qa, strict), strict) == "hold"


def test_models_without_uncertainty_are_not_judged_by_it() -> None:
    maps, px = maps_with_sd(0.0, 0.0, 0.0, with_sd=False)
    qa = compute_qa(maps, px, 90.0, 4000.0)
    assert "uncertainty" not in qa
    assert uncertainty_violations(qa, ProtocolConfig()) == []


def test_new_qa_keys_at_their_defaults_keep_the_protocol_hash() -> None:
    """Sites' audit records name a protocol by its hash: adding these keys must not change it."""
    base = ProtocolConfig()
    same = ProtocolConfig.model_validate({"qa": {"uncertainty_action": "hold", "max_t1_uncertainty": None}})
    other = ProtocolConfig.model_validate({"qa": {"uncertainty_action": "warn"}})
    assert same.content_hash == base.content_hash
    assert other.content_hash != base.content_hash


def test_the_models_calibrated_limits_apply_unless_the_protocol_sets_its_own() -> None:
    """qmap-se's sd has its own scale: a series at ±62 % T1 is in-domain for a model calibrated to ±78 %."""
    maps, px = maps_with_sd(0.62, 0.50, 0.20)
    qa = compute_qa(maps, px, 90.0, 4000.0)
    default = ProtocolConfig()
    assert len(uncertainty_violations(qa, default)) == 2  # no model limits recorded: 35 %
    qa["uncertainty_limits"] = {"t1_rel_sd": 0.78, "t2_rel_sd": 0.9, "pd_rel_sd": 0.33}
    assert uncertainty_violations(qa, default) == []
    assert uncertainty_limit(qa, default, "t1_rel_sd") == (0.78, "model")
    tighter = {**qa["uncertainty_limits"], "t2_rel_sd": 0.45}
    unc = uncertainty_violations({**qa, "uncertainty_limits": tighter}, default)
    assert len(unc) == 1 and "median T2 ±50 % in the body; the model's calibrated limit 45 %" in unc[0], unc
    site = ProtocolConfig.model_validate({"qa": {"max_t1_uncertainty": 0.5}})
    unc = uncertainty_violations(qa, site)
    assert len(unc) == 1 and "median T1 ±62 % in the body; the protocol's limit 50 %" in unc[0], unc
