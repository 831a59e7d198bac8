"""Training batches from a researcher's own spin-echo series (an :class:`~rtcontrast.research.importer.ImportReport`).

Why: a physicist fine-tunes the model for their anatomy and scanner on what they have:
one or two SE contrasts per patient, no maps.  This source turns the importer's report
into network-ready batches:

* every eligible series is loaded once (``importer.load_series``, full geometry checks;
  a series that fails to load is skipped with a log line naming its UID and why) and
  normalised exactly as the node does (``qmap/1``): divided by its series scale, the
  99th percentile of its voxels > 0;
* **unpaired** samples: a random slice of a random series, randomly cropped (or zero
  padded) to the training patch, with the header TE/TR;
* **paired** samples: two series of one patient in one frame of reference with the same
  matrix (the importer's paired groups) give (input, target) slices at the same position
  and the same crop; each keeps its own series scale (the model's PD is in the input's
  units; the paired loss compares after a least-squares gain).

Random draws use the generator passed in (never numpy's global state), so adding a real
source does not change the phantom path's random sequence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtcontrast.core.contract import series_scale
from rtcontrast.research.dataset import INPUT_PERCENTILE
from rtcontrast.research.importer import ImportReport, SeriesInfo, load_series, scan

log = logging.getLogger(__name__)


@dataclass
class RealSeries:
    """One loaded, normalised series."""

    pixels: np.ndarray  # [N,H,W] float32, stored values / scale
    te: float
    tr: float
    scale: float
    series_uid: str
    patient_hash: str
    for_uid: str


class RealDataSource:
    """Unpaired and paired batches from an import report (see the module docstring)."""

    def __init__(self, report: ImportReport, patch: int, percentile: float = INPUT_PERCENTILE) -> None:
        self.patch = patch
        self.report = report
        self.series: list[RealSeries] = []
        index: dict[str, int] = {}
        for info in report.series:
            rs = self._load(info, percentile)
            if rs is not None:
                index[f"{info.series_uid}|{info.te_ms}|{info.tr_ms}"] = len(self.series)
                self.series.append(rs)
        #: (input index, target index), both directions, same patient / FoR / matrix, other TE/TR
        self.pairs: list[tuple[int, int]] = []
        for g in report.paired_groups:
            if not g.same_matrix:
                log.info("paired group FoR %s: different matrices, used unpaired only", g.for_uid)
                continue
            members = [index[k] for k in (f"{s.series_uid}|{s.te_ms}|{s.tr_ms}" for s in g.series) if k in index]
            for a in members:
                for b in members:
                    sa, sb = self.series[a], self.series[b]
                    if a != b and (sa.te, sa.tr) != (sb.te, sb.tr) and sa.pixels.shape == sb.pixels.shape:
                        self.pairs.append((a, b))
        if not self.series:
            raise ValueError(f"no usable spin-echo series under {report.root} (run: python -m rtcontrast.research.importer "
                             f"scan {report.root})")
        log.info("real data: %d series (%d slices), %d paired direction(s), contrasts %s", len(self.series),
                 sum(s.pixels.shape[0] for s in self.series), len(self.pairs),
                 sorted({(s.te, s.tr) for s in self.series}))

    @classmethod
    def from_folder(cls, folder: str | Path, patch: int) -> RealDataSource:
        """Scan ``folder`` with the importer (the node's eligibility rules) and load it."""
        return cls(scan(folder), patch)

    @staticmethod
    def _load(info: SeriesInfo, percentile: float) -> RealSeries | None:
        try:
            pixels, te, tr = load_series(info)
        except Exception as exc:  # VolumeError, ValueError, nibabel errors: skip this series, say why
            log.warning("series %s: not used for training: %s: %s", info.series_uid, type(exc).__name__, exc)
            return None
        pixels = np.asarray(pixels, np.float32)
        s = series_scale(pixels, percentile)
        return RealSeries(pixels / np.float32(s), float(te), float(tr), s, info.series_uid, info.patient_hash,
                          info.for_uid)

    @property
    def contrasts(self) -> np.ndarray:
        """[M,2] TE/TR of every loaded series (the empirical contrast distribution)."""
        return np.array([[s.te, s.tr] for s in self.series], np.float32)

    def _window(self, shape: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
        """Random crop (source offsets) / pad (destination offsets) to the patch."""
        h, w = shape
        p = self.patch
        sy = int(rng.integers(0, h - p + 1)) if h > p else 0
        sx = int(rng.integers(0, w - p + 1)) if w > p else 0
        dy = int(rng.integers(0, p - h + 1)) if h < p else 0
        dx = int(rng.integers(0, p - w + 1)) if w < p else 0
        return sy, sx, dy, dx

    def _cut(self, img: np.ndarray, win: tuple[int, int, int, int]) -> np.ndarray:
        sy, sx, dy, dx = win
        p = self.patch
        out = np.zeros((p, p), np.float32)
        part = img[sy:sy + p, sx:sx + p]
        out[dy:dy + part.shape[0], dx:dx + part.shape[1]] = part
        return out

    def unpaired_batch(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        """``image`` [n,1,P,P] (normalised), ``te_tr`` [n,2] ms from the headers."""
        imgs, tt = [], []
        for _ in range(n):
            s = self.series[int(rng.integers(len(self.series)))]
            z = int(rng.integers(s.pixels.shape[0]))
            imgs.append(self._cut(s.pixels[z], self._window(s.pixels.shape[1:], rng)))
            tt.append((s.te, s.tr))
        return {"image": np.stack(imgs)[:, None], "te_tr": np.asarray(tt, np.float32)}

    def paired_batch(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        """``image``/``te_tr`` (input) and ``target``/``target_te_tr`` at the same slice and crop."""
        if not self.pairs:
            raise ValueError("no paired series (two SE contrasts of one frame of reference with the same matrix)")
        imgs, tgts, tt, ttt = [], [], [], []
        for _ in range(n):
            a, b = self.pairs[int(rng.integers(len(self.pairs)))]
            sa, sb = self.series[a], self.series[b]
            z = int(rng.integers(sa.pixels.shape[0]))
            win = self._window(sa.pixels.shape[1:], rng)
            imgs.append(self._cut(sa.pixels[z], win))
            tgts.append(self._cut(sb.pixels[z], win))
            tt.append((sa.te, sa.tr))
            ttt.append((sb.te, sb.tr))
        return {"image": np.stack(imgs)[:, None], "te_tr": np.asarray(tt, np.float32),
                "target": np.stack(tgts)[:, None], "target_te_tr": np.asarray(ttt, np.float32)}

    def validation_pairs(self, max_slices: int = 32) -> list[dict[str, np.ndarray]]:
        """Deterministic centre-cropped paired slices (every pair direction), for validation."""
        rng = np.random.default_rng(97)
        out = []
        for a, b in self.pairs:
            sa, sb = self.series[a], self.series[b]
            zs = np.linspace(0, sa.pixels.shape[0] - 1, min(sa.pixels.shape[0], 4)).round().astype(int)
            for z in zs:
                win = self._window(sa.pixels.shape[1:], rng)
                out.append({"image": self._cut(sa.pixels[z], win)[None, None],
                            "te_tr": np.asarray([[sa.te, sa.tr]], np.float32),
                            "target": self._cut(sb.pixels[z], win)[None, None],
                            "target_te_tr": np.asarray([[sb.te, sb.tr]], np.float32)})
                if len(out) >= max_slices:
                    return out
        return out
