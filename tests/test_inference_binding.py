"""The inference provider path (#13): I/O binding gives session.run's numbers; the CUDA path is detected or skipped.

No GPU on the CI machine: the binding code is checked on the CPU device (same kernels,
so the same numbers), and the GPU parity test runs only where CUDA is really present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rtcontrast.core.inference import (
    GPU_MAX_BATCH_PIXELS,
    MAX_BATCH_PIXELS,
    QMapModel,
    choose_providers,
    cuda_present,
)
from tests.support import phantom_image

MODEL = Path(__file__).resolve().parents[1] / "models" / "qmap-pelvis.onnx"


def test_io_binding_gives_the_same_maps_as_session_run() -> None:
    plain = QMapModel(MODEL, "cpu")
    bound = QMapModel(MODEL, "cpu")
    bound.io_device = "cpu"
    px = phantom_image(n=5, size=64)
    a = plain.predict(px, 90.0, 4000.0, batch_size=2)
    b = bound.predict(px, 90.0, 4000.0, batch_size=2)
    for name in ("pd", "t1", "t2", "te_tr_pred"):
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=1e-6, atol=1e-6, err_msg=name)
    assert a.pd.shape == (5, 64, 64)


def test_cpu_node_without_gpu_keeps_cpu_batches() -> None:
    m = QMapModel(MODEL, "cpu")
    assert (m.provider, m.batch_slices, m.max_batch_pixels, m.io_device) == ("CPUExecutionProvider", 8,
                                                                             MAX_BATCH_PIXELS, None)


@pytest.mark.skipif(cuda_present(), reason="a GPU is present")
def test_without_cuda_auto_is_cpu_and_cuda_is_refused_clearly() -> None:
    assert choose_providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(RuntimeError, match="no CUDA device"):
        choose_providers("cuda")


@pytest.mark.skipif(not cuda_present(), reason="no CUDA device here")
def test_gpu_maps_match_the_cpu() -> None:  # pragma: no cover - runs only on a GPU machine
    gpu, cpu = QMapModel(MODEL, "cuda"), QMapModel(MODEL, "cpu")
    assert gpu.provider == "CUDAExecutionProvider" and gpu.io_device == "cuda"
    assert gpu.max_batch_pixels == GPU_MAX_BATCH_PIXELS and gpu.batch_slices == 64
    px = phantom_image(n=12, size=64)
    a, b = cpu.predict(px, 90.0, 4000.0), gpu.predict(px, 90.0, 4000.0)
    for name in ("t1", "t2"):
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=1e-3, atol=0.5, err_msg=name)
    np.testing.assert_allclose(b.pd, a.pd, rtol=1e-3, atol=1e-3 * float(a.scale))
