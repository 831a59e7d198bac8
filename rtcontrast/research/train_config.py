"""The training recipe (YAML -> TrainConfig): every knob of a run, checked before it starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml



log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved into checkpoints and the model card)."""

    name: str = "qmap-pelvis"
    version: str = "1.0.0"
    seed: int = 1234
    steps: int = 2000
    batch_size: int = 12
    patch: int = 128
    n_train_subjects: int = 2400
    n_val: int = 48
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    val_every: int = 250
    ckpt_every: int = 250
    random_targets: int = 2
    p_seed_contrast: float = 0.5
    scale_jitter: float = 0.25
    w_render: float = 1.0
    w_maps: float = 0.5
    w_pd: float = 0.1
    w_clean: float = 1.0
    w_ident: float = 0.1
    threads: int = 2
    cache_dir: str = "var/cache"
    out_dir: str = "var/train/default"
    model: dict[str, Any] = field(default_factory=lambda: {"widths": [16, 32, 64, 96, 128], "id_hidden": 64})
    #: "qmap/1" (one input) or "qmap/2" (K co-registered inputs, any subset present)
    contract: str = "qmap/1"
    max_inputs: int = 5
    #: qmap/2: probability of 1, 2, ... present inputs per sample
    p_inputs: list[float] = field(default_factory=lambda: [0.3, 0.3, 0.2, 0.1, 0.1])
    # -- data sources (weights of each source's total loss; real sources need data_dir, qmap/1 only)
    w_phantom: float = 1.0
    w_unpaired: float = 0.0
    w_paired: float = 0.0
    #: folder of the researcher's own SE series (scanned with rtcontrast.research.importer)
    data_dir: str | None = None
    #: real slices per batch and source (per rank)
    real_batch_size: int = 4
    # -- unpaired terms
    w_u_self: float = 1.0
    w_u_id_real: float = 1.0
    w_u_id_render: float = 1.0
    w_u_adv: float = 0.05
    disc: dict[str, Any] = field(default_factory=lambda: {"widths": [16, 32, 64], "dropout": 0.2})
    lr_disc: float = 1e-4
    # -- paired terms: "lsq_gain" (per-sample least-squares gain) or "percentile" (both / 99th percentile)
    paired_compare: str = "lsq_gain"
    # -- fine-tuning: a training checkpoint (.pt) to start from (its architecture is used)
    init: str | None = None
    #: qmap/2: probability that a sample with >= 2 inputs has one T1w and one T2w among them
    p_complementary: float = 0.0
    #: qmap/2: start as an exact copy of this trained qmap/1 checkpoint (model.fusion_from_single)
    init_single: str | None = None
    #: qmap/2: start the fused branch from this earlier fusion checkpoint instead (needs init_single)
    init_fused: str | None = None
    #: qmap/2: a frozen copy of init_single answers single-input cases (model.QMapFusionNet)
    fusion_gated: bool = False
    #: qmap/2: the encoder also sees log intensities (voxel-wise log ratios between inputs)
    fusion_log_input: bool = False
    #: validation metric that selects best.pt: "render" (phantom) or "real_cross" (paired real data)
    select_on: str = "render"
    #: CUDA autocast: "none", "bf16", "fp16" or "auto" (bf16 where supported, else fp16); ignored on CPU
    amp: str = "none"
    #: wall-clock budget in seconds (None: none).  The cosine schedule then runs on the larger of step/steps and
    #: elapsed/budget, and training stops (validated, checkpointed) when the budget is spent, so a run on a slow or
    #: shared machine still ends with a decayed learning rate.  Elapsed time carries over --resume.
    time_budget_s: float | None = None
    #: warm start from an exported ONNX model of the same widths (rtcontrast.research.warmstart: folded BatchNorms are
    #: re-derived on a training batch; new input/output channels start fresh); ignored on --resume
    init_onnx: str | None = None
    #: qmap/3: phantom slices per source {pelvis, random, abdomen} (rtcontrast.research.dataset_se); the mix is by count
    se_sources: dict[str, int] = field(default_factory=lambda: {"pelvis": 2000, "random": 2000, "abdomen": 1000})
    #: qmap/3: validation slices per source (held-out seeds)
    se_val_sources: dict[str, int] = field(default_factory=lambda: {"pelvis": 24, "random": 16, "abdomen": 8})
    #: qmap/3: weight of the Gaussian NLL of log T1, log T2, log PD (trains the uncertainty outputs)
    w_nll: float = 0.1
    #: processes that make phantom batches ahead of the step (rtcontrast.research.prefetch; 0: in the training process,
    #: from one sequential generator).  On a GPU the phantom acquisition on the CPU is the bottleneck.  With workers
    #: each step's batch comes from a generator seeded by (seed, rank, step): the run is the same for any number.
    data_workers: int = 0
    #: batches in flight per data worker
    prefetch_per_worker: int = 2

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        data = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise SystemExit(f"{path}: unknown training option(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    @property
    def uses_real(self) -> bool:
        """True when a real-data source has weight (and so needs ``data_dir``)."""
        return self.w_unpaired > 0 or self.w_paired > 0

    def check(self) -> None:
        """Refuse inconsistent settings with a message that says what to change."""
        if self.uses_real and not self.data_dir:
            raise SystemExit("w_unpaired/w_paired > 0 need data_dir: the folder of your SE series")
        if self.uses_real and self.contract != "qmap/1":
            raise SystemExit("real-data training (w_unpaired/w_paired) is implemented for qmap/1 models only")
        if self.w_phantom <= 0 and not self.uses_real:
            raise SystemExit("no data source has weight: set w_phantom, w_unpaired or w_paired > 0")
        if self.paired_compare not in ("lsq_gain", "percentile"):
            raise SystemExit(f"paired_compare must be lsq_gain or percentile, got {self.paired_compare!r}")
        if self.select_on not in ("render", "real_cross"):
            raise SystemExit(f"select_on must be render or real_cross, got {self.select_on!r}")
        if self.select_on == "real_cross" and not self.data_dir:
            raise SystemExit("select_on: real_cross needs data_dir with paired series")
        if (self.fusion_gated or self.init_fused) and not (self.init_single or self.init):
            raise SystemExit("fusion_gated / init_fused need init_single: the trained qmap/1 checkpoint")
        if self.contract == "qmap/3" and self.uses_real:
            raise SystemExit("real-data training is not implemented for qmap/3 models yet (phantom sources only)")
        if self.data_workers < 0 or self.prefetch_per_worker < 1:
            raise SystemExit("data_workers must be >= 0 and prefetch_per_worker >= 1")
        if self.data_workers and (self.uses_real or self.w_phantom != 1.0):
            raise SystemExit("data_workers is for phantom-only training (w_phantom 1, no real data); set data_workers: 0")
        if self.amp not in ("none", "bf16", "fp16", "auto"):
            raise SystemExit(f"amp must be none, bf16, fp16 or auto, got {self.amp!r}")
