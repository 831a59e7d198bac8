"""Quantitative maps through onnxruntime, per the ``qmap/1`` contract (the node's only model code).

The node never imports torch.  This module loads a model file, refuses one whose
contract it does not know (with a message that says what is wrong), picks the
execution provider (CUDA when a GPU is really there, else CPU, decided once and logged
once), and runs a whole series: series scale, padding to the model's multiple,
batching, cropping, and un-scaling PD back to stored-value units.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from rtcontrast.core.consistency import Settings
from rtcontrast.core.fusion import fused_consistent
from rtcontrast.core.maps import QMaps
from rtcontrast.core.contract import (
    DEFAULT_FIELD_T,
    INPUT_NAMES,
    INPUT_NAMES_FUSION,
    INPUT_NAMES_SE,
    OUTPUT_NAMES,
    UNCERTAINTY_OUTPUT_NAMES,
    ContractError,
    ModelInfo,
    pad_amounts,
    parse_metadata,
    series_scale,
)

log = logging.getLogger(__name__)

#: ``out(name, shape)`` -> a float32 [N,H,W] array-like that takes ``m[a:b] = values``.
MapAllocator = Callable[[str, tuple[int, ...]], Any]


def _new_map(name: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.empty(shape, np.float32)


def _load_malloc_trim() -> Callable[[], object] | None:
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


#: glibc's ``malloc_trim(0)``: hands the heap's free pages back to the system (None elsewhere).
#: Called after each CPU batch: ONNX Runtime's freed activations (no arena, see
#: :class:`QMapModel`) otherwise stay resident in malloc's per-thread heaps and add to the
#: next batch's peak: 512x512x200 peaked at 688 MB with it, 709-773 MB in three runs
#: without (bench/memory.py, #13); inference time unchanged within the noise.
release_free_heap = _load_malloc_trim()

#: Most pixels (slices x padded rows x padded columns x inputs) in one ``session.run``:
#: 8 slices of 256x256.  Activation memory grows with the batch's pixels and ONNX
#: Runtime's arena keeps its peak for the life of the session (8 slices of 512x512 held
#: over 1 GB), so larger matrices run in smaller batches; per-slice speed is no worse.
MAX_BATCH_PIXELS = 8 * 256 * 256
#: The same bound on a GPU (CUDA provider): 64 slices of 256x256 per run keep an H100/H200
#: busy (a kernel launch per layer costs the same for 8 slices or 64) while the
#: activations stay a few GB, far below the device's memory.  Not measured here (no GPU).
GPU_MAX_BATCH_PIXELS = 64 * 256 * 256
#: CUDA provider options: grow the device arena by what is asked (not by powers of two),
#: and pick convolution algorithms once per shape (the node runs the same shapes again).
CUDA_OPTIONS: dict[str, object] = {"device_id": 0, "arena_extend_strategy": "kSameAsRequested",
                                   "cudnn_conv_algo_search": "EXHAUSTIVE", "do_copy_in_default_stream": True}


def cuda_present() -> bool:
    """True when an NVIDIA driver and device are visible (checked before asking ORT for CUDA).

    onnxruntime-gpu lists CUDAExecutionProvider even on machines without a GPU and logs
    an error when asked for it there; probing the driver first keeps start-up clean.
    """
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    if not any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvidiactl")) and not os.environ.get("RTCONTRAST_FORCE_CUDA_PROBE"):
        return False
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def choose_providers(preference: str = "auto") -> list[str]:
    """Execution providers for ``preference`` in {auto, cpu, cuda}."""
    if preference == "cpu":
        return ["CPUExecutionProvider"]
    if preference == "cuda":
        if not cuda_present():
            raise RuntimeError("execution_provider 'cuda' requested but no CUDA device/driver is present")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if preference != "auto":
        raise ValueError(f"unknown execution provider preference {preference!r} (auto|cpu|cuda)")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda_present() else ["CPUExecutionProvider"]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_io(sess: ort.InferenceSession, path: Path, info: ModelInfo) -> None:
    ins = {i.name: i for i in sess.get_inputs()}
    outs = {o.name: o for o in sess.get_outputs()}
    names = INPUT_NAMES_FUSION if info.fusion else INPUT_NAMES_SE if info.takes_field else INPUT_NAMES
    if set(ins) != set(names):
        raise ContractError(f"{path}: inputs are {sorted(ins)}, {info.contract} requires {list(names)}")
    missing = [n for n in OUTPUT_NAMES if n not in outs]
    if missing:
        raise ContractError(f"{path}: outputs lack {missing}; {info.contract} requires {list(OUTPUT_NAMES)}")
    te_rank = 3 if info.fusion else 2
    if len(ins["image"].shape) != 4 or len(ins["te_tr"].shape) != te_rank:
        raise ContractError(f"{path}: input ranks must be image 4 and te_tr {te_rank} for {info.contract}, got "
                            f"{ins['image'].shape} and {ins['te_tr'].shape}")
    if info.takes_field and len(ins["field_t"].shape) != 2:
        raise ContractError(f"{path}: input 'field_t' must be [N,1] for {info.contract}, got {ins['field_t'].shape}")
    for n in names:
        if ins[n].type != "tensor(float)":
            raise ContractError(f"{path}: input {n!r} must be float32, is {ins[n].type}")


class QMapModel:
    """A loaded ``qmap/1`` model ready to run series."""

    def __init__(self, path: str | Path, provider: str = "auto", threads: int = 0) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ContractError(f"model file {self.path} does not exist")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No CPU memory arena: the arena keeps the largest batch's activations (150-400 MB)
        # for the life of the node, which runs one job at a time with long idle gaps;
        # per-slice speed measured the same without it (bench/inference.py, bench/memory.py).
        so.enable_cpu_mem_arena = False
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        providers: list[str | tuple[str, dict[str, object]]] = [
            (p, CUDA_OPTIONS) if p == "CUDAExecutionProvider" else p for p in choose_providers(provider)]
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ContractError(f"{self.path}: onnxruntime cannot load it: {exc}") from exc
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.info: ModelInfo = parse_metadata(meta)
        except ContractError as exc:
            raise ContractError(f"{self.path}: {exc}") from exc
        _check_io(self.session, self.path, self.info)
        self.sha256 = file_sha256(self.path)
        self.provider = self.session.get_providers()[0]
        on_gpu = self.provider == "CUDAExecutionProvider"
        #: bound on pixels per run and the default slices per batch (larger on a GPU)
        self.max_batch_pixels = GPU_MAX_BATCH_PIXELS if on_gpu else MAX_BATCH_PIXELS
        self.batch_slices = 64 if on_gpu else 8
        #: where :meth:`run_normalised` binds inputs and outputs (I/O binding): on the GPU the
        #: inputs are copied to the device once per batch and the outputs come back in one
        #: copy, instead of ORT staging every tensor itself; None = plain ``session.run``
        #: (CPU: binding saves nothing there; tests set "cpu" to check the binding code).
        self.io_device: str | None = "cuda" if on_gpu else None
        exported = {o.name for o in self.session.get_outputs()}
        #: the optional uncertainty outputs this model exports (qmap/3), in contract order
        self.uncertainty_outputs: tuple[str, ...] = tuple(n for n in UNCERTAINTY_OUTPUT_NAMES if n in exported)

    def describe(self) -> str:
        return (f"model {self.info.name} {self.info.version} ({self.path.name}, sha256 {self.sha256[:12]}) "
                f"on {self.provider}")

    def run_normalised(self, image: np.ndarray, te_tr: np.ndarray, present: np.ndarray | None = None,
                       field_t: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """One raw ``session.run`` on already normalised, padded input (``present`` for qmap/2, ``field_t`` [N,1] for qmap/3).

        Returns the contract's outputs plus the optional uncertainty outputs the model has.
        """
        feeds = {"image": image, "te_tr": te_tr}
        if self.info.fusion:
            if present is None:
                raise ValueError(f"{self.info.contract} model needs 'present'")
            feeds["present"] = present
        if self.info.takes_field:
            if field_t is None:
                raise ValueError(f"{self.info.contract} model needs 'field_t'")
            feeds["field_t"] = np.asarray(field_t, np.float32).reshape(-1, 1)
        names = list(OUTPUT_NAMES) + list(self.uncertainty_outputs)
        if self.io_device is None:
            outs = self.session.run(names, feeds)
        else:
            outs = self._run_bound(names, feeds, self.io_device)
        return dict(zip(names, outs))

    def _run_bound(self, names: list[str], feeds: dict[str, np.ndarray], device: str) -> list[np.ndarray]:
        """``session.run`` through I/O binding: inputs placed on ``device`` once, outputs allocated there."""
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), device, 0))
        for name in names:
            binding.bind_output(name, device)
        self.session.run_with_iobinding(binding)
        return list(binding.copy_outputs_to_cpu())

    def predict(self, pixels: np.ndarray, te_ms: float, tr_ms: float, batch_size: int | None = None,
                field_t: float | None = None, out: MapAllocator | None = None, scale: float | None = None) -> QMaps:
        """Maps of a series ``pixels`` [N,H,W] (stored values after Modality LUT).

        ``field_t``: the series' MagneticFieldStrength (T); used by ``qmap/3`` models (when
        None they get :data:`~rtcontrast.core.contract.DEFAULT_FIELD_T`, and ``QMaps.field_t_assumed``
        says so), ignored by ``qmap/1``/``qmap/2`` models.
        ``scale``: the series scale when ``pixels`` are only some slices of a series (the node
        infers a sample first, then slab by slab: :mod:`rtcontrast.node.gate`); the slices'
        maps are then exactly those of the whole series.  None: computed from ``pixels``.
        """
        return self.predict_multi([(pixels, te_ms, tr_ms)], batch_size, field_t=field_t, out=out, scale=scale)

    def predict_multi(self, inputs: list[tuple[np.ndarray, float, float]], batch_size: int | None = None,
                      consistency: Settings | None = None, valid: list[np.ndarray | None] | None = None,
                      field_t: float | None = None, known_gains: tuple[list[float], str] | None = None,
                      out: MapAllocator | None = None, scale: float | None = None) -> QMaps:
        """Maps from one or more co-registered series [(pixels [N,H,W], TE, TR), ...].

        ``batch_size`` (default 8 on the CPU, 64 on a GPU) is an upper bound: batches never exceed
        :data:`MAX_BATCH_PIXELS` (:data:`GPU_MAX_BATCH_PIXELS` on a GPU).

        The first series is the geometric target and defines PD's units.  Several inputs
        need a ``qmap/2`` model; extra inputs beyond its ``max_inputs`` are an error.
        ``consistency``: with two or more inputs, the maps are fitted so that they re-render
        every input (:mod:`rtcontrast.core.consistency`), with the gains between inputs from
        the data and physics (:mod:`rtcontrast.core.gains`; ``known_gains`` = (per input the stored
        value per common physical unit, what says so) when DICOM says) and the
        network in a canonical input order, so T1/T2 do not depend on which series is first.
        ``valid``: per input, where it is a measurement (a resampled partner's field of view;
        None = all).  ``field_t``: the session's field strength (T) for the reference tissues.
        ``out(name, shape)``: where each full-series map (pd, t1, t2, uncertainty) is filled in
        batch by batch (default: a new float32 array; the node passes
        :func:`rtcontrast.core.maps.slab_allocator`, so the maps never sit whole in memory).
        Not used by the data-consistency fit, which needs its maps in memory.
        ``scale``: the first input's series scale, when it was computed over more slices than
        ``inputs`` hold (see :meth:`predict`).
        """
        if consistency is not None and len(inputs) > 1:
            return fused_consistent(self, inputs, batch_size, consistency, valid, field_t, known_gains)
        if not inputs:
            raise ValueError("no input series")
        if len(inputs) > self.info.max_inputs:
            raise ValueError(f"{len(inputs)} input series, model {self.info.name} takes at most {self.info.max_inputs}")
        pixels = inputs[0][0]
        if pixels.ndim != 3:
            raise ValueError(f"pixels must be [N,H,W], got shape {pixels.shape}")
        for extra, _, _ in inputs[1:]:
            if extra.shape != pixels.shape:
                raise ValueError(f"input series shapes differ: {extra.shape} vs {pixels.shape}")
        n, h, w = pixels.shape
        scales = [series_scale(p, self.info.input_percentile) if (j or scale is None) else float(scale)
                  for j, (p, _, _) in enumerate(inputs)]
        s = scales[0]
        ph, pw = pad_amounts(h, w, self.info.spatial_multiple)
        k = self.info.max_inputs if self.info.fusion else 1
        batch_size = max(1, min(batch_size or self.batch_slices, self.max_batch_pixels // ((h + ph) * (w + pw) * k)))
        alloc = out or _new_map
        pd, t1, t2 = (alloc(name, (n, h, w)) for name in ("pd", "t1", "t2"))
        te_tr_pred = np.empty((n, 2), np.float32)
        unc = {u: alloc(u, (n, h, w)) for u in self.uncertainty_outputs}
        field_used: float | None = None
        assumed = False
        if self.info.takes_field:
            assumed = field_t is None or not np.isfinite(field_t) or field_t <= 0
            field_used = DEFAULT_FIELD_T if assumed else float(field_t)  # type: ignore[arg-type]
            if assumed:
                log.warning("series has no usable MagneticFieldStrength (%r): model %s assumes %.1f T", field_t,
                            self.info.name, DEFAULT_FIELD_T)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            x = np.zeros((stop - start, k, h + ph, w + pw), np.float32)
            tt = np.zeros((stop - start, k, 2), np.float32)
            for j, ((px, te, tr), sc) in enumerate(zip(inputs, scales)):
                x[:, j, :h, :w] = px[start:stop] * np.float32(1.0 / sc)
                tt[:, j] = (te, tr)
            present = np.zeros((stop - start, k), np.float32)
            present[:, : len(inputs)] = 1.0
            ft = np.full((stop - start, 1), field_used or 0.0, np.float32) if self.info.takes_field else None
            o = self.run_normalised(x, tt if self.info.fusion else tt[:, 0], present, ft)
            pd[start:stop] = o["pd"][:, 0, :h, :w] * np.float32(s)
            for u in self.uncertainty_outputs:
                unc[u][start:stop] = o[u][:, 0, :h, :w] * np.float32(s if u == "pd_sd" else 1.0)
            t1[start:stop] = o["t1"][:, 0, :h, :w]
            t2[start:stop] = o["t2"][:, 0, :h, :w]
            te_tr_pred[start:stop] = o["te_tr_pred"]
            del o, x
            if release_free_heap is not None and self.io_device is None:
                release_free_heap()
        return QMaps(pd=pd, t1=t1, t2=t2, te_tr_pred=te_tr_pred, scale=s,
                     t1_log_sd=unc.get("t1_log_sd"), t2_log_sd=unc.get("t2_log_sd"), pd_sd=unc.get("pd_sd"),
                     field_t=field_used, field_t_assumed=assumed)
