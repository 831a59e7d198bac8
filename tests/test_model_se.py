"""The qmap/3 network: field conditioning, uncertainty outputs and the NLL that trains them."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from rtcontrast.research.model import ModelConfig  # noqa: E402
from rtcontrast.research.model_se import LOG_SD_RANGE, QMapSENet, gaussian_nll  # noqa: E402
from rtcontrast.core.physics import signal  # noqa: E402


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_nll_is_minimised_at_the_true_sd(beta: float) -> None:
    g = torch.Generator().manual_seed(0)
    true_sd = 0.2
    truth = torch.zeros(1, 1, 64, 64)
    pred = truth + true_sd * torch.randn(1, 1, 64, 64, generator=g)
    mask = torch.ones_like(truth, dtype=torch.bool)
    grid = torch.linspace(0.05, 0.6, 111)
    # beta-weighting changes the loss value, not where its gradient in sd vanishes: check the stationary point
    # one sd shared by all voxels (per voxel, the optimum is that voxel's |error|)
    log_sd = torch.tensor(float(torch.log(torch.tensor(0.5))), requires_grad=True)
    opt = torch.optim.Adam([log_sd], lr=0.02)
    for _ in range(800):
        opt.zero_grad()
        gaussian_nll(pred, truth, log_sd.exp().expand_as(truth), mask, beta=beta).backward()
        opt.step()
    rms = float(((pred - truth) ** 2).mean().sqrt())
    assert float(log_sd.exp()) == pytest.approx(rms, rel=0.03)
    if beta == 0.0:  # the plain NLL as a function of one shared sd is lowest at the RMS error
        losses = torch.stack([gaussian_nll(pred, truth, torch.full_like(truth, float(s)), mask, beta=0.0) for s in grid])
        assert float(grid[int(losses.argmin())]) == pytest.approx(rms, abs=0.01)


def test_nll_ignores_voxels_outside_the_mask_and_does_not_move_the_mean() -> None:
    truth = torch.zeros(1, 1, 8, 8)
    pred = torch.zeros(1, 1, 8, 8, requires_grad=True)
    mask = torch.zeros_like(truth, dtype=torch.bool)
    mask[..., :4] = True
    err = pred.detach().clone()
    err[..., 4:] = 100.0  # huge errors outside the mask
    a = gaussian_nll(err, truth, torch.full_like(truth, 0.1), mask)
    b = gaussian_nll(torch.zeros_like(truth), truth, torch.full_like(truth, 0.1), mask)
    assert float(a) == pytest.approx(float(b))
    sd = torch.full_like(truth, 0.1, requires_grad=True)
    gaussian_nll(pred + 0.5, truth, sd, torch.ones_like(mask)).backward()
    assert sd.grad is not None and float(sd.grad.abs().sum()) > 0
    assert pred.grad is None  # the mean is trained by the maps' own losses only


def test_forward_shapes_ranges_and_field_conditioning() -> None:
    torch.manual_seed(0)
    net = QMapSENet(ModelConfig(widths=[8, 16, 16], id_hidden=8)).eval()
    with torch.no_grad():  # make the head depend on the decoder features (it starts at zero weight)
        net.head.weight.normal_(0, 0.5)
    x = torch.rand(2, 1, 32, 48)
    tt = torch.tensor([[80.0, 3000.0], [10.0, 500.0]])
    with torch.no_grad():
        out15 = net(x, tt, torch.tensor([[1.5], [1.5]]))
        out30 = net(x, tt, torch.tensor([[3.0], [3.0]]))
    pd, t1, t2, idp, t1_sd, t2_sd, pd_sd = out15
    assert pd.shape == t1.shape == t1_sd.shape == pd_sd.shape == (2, 1, 32, 48) and idp.shape == (2, 2)
    for sd in (t1_sd, t2_sd):
        assert float(sd.min()) >= LOG_SD_RANGE[0] and float(sd.max()) <= LOG_SD_RANGE[1]
    assert (pd_sd >= 0).all()
    assert not torch.allclose(out15[1], out30[1])  # the field strength reaches the maps
    torch.testing.assert_close(out15[3], out30[3])  # ... but not the identification (image alone)
    # PD is solved from the signal equation: re-rendering at the input's TE/TR gives the (denoised) input back
    own = signal(pd, tt[:, 0, None, None, None], tt[:, 1, None, None, None], t1, t2, xp=torch)
    assert float((own - x).abs().max()) < 0.6


def test_initial_uncertainty_is_moderate() -> None:
    net = QMapSENet(ModelConfig(widths=[8, 16, 16], id_hidden=8)).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 1, 16, 16), torch.tensor([[80.0, 3000.0]]), torch.tensor([[1.5]]))
    assert float(out[4].mean()) == pytest.approx(0.3, rel=1e-3)
