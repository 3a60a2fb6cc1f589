"""The SimSiam loss against a direct implementation of the paper's formulas, values and gradients."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from simsiam.config import LossConfig, ModelConfig
from simsiam.loss import cross_entropy, negative_cosine, simsiam_loss
from simsiam.model import SimSiam

# ---- the paper's formulas, written out in numpy (float64), with hand-derived gradients.
# D(p, z) = -1/n sum_i <p_i/|p_i|, z_i/|z_i|>          (cosine)
# D(p, z) = -1/n sum_i softmax(z_i) . log softmax(p_i)  (cross-entropy)


def _softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def d_cosine(p, z):
    """Value and gradients (dD/dp, dD/dz) of the negative cosine."""
    n = p.shape[0]
    pn, zn = np.linalg.norm(p, axis=1, keepdims=True), np.linalg.norm(z, axis=1, keepdims=True)
    ph, zh = p / pn, z / zn
    cos = (ph * zh).sum(axis=1, keepdims=True)
    grad_p = -(zh - cos * ph) / pn / n
    grad_z = -(ph - cos * zh) / zn / n
    return -cos.mean(), grad_p, grad_z


def d_cross_entropy(p, z):
    n = p.shape[0]
    s, q = _softmax(z), _softmax(p)
    logq = np.log(q)
    value = -(s * logq).sum(axis=1).mean()
    grad_p = (q - s) / n  # d/dp of -sum_j s_j log q_j, with sum_j s_j = 1
    grad_z = -(s * logq - s * (s * logq).sum(axis=1, keepdims=True)) / n  # -J_softmax(z)^T log q
    return value, grad_p, grad_z


def paper_loss(p1, p2, z1, z2, similarity, symmetric, stop_gradient):
    """L and its gradients wrt (p1, p2, z1, z2); stop-gradient zeroes the target gradients."""
    D = d_cosine if similarity == "cosine" else d_cross_entropy
    zero = np.zeros_like(p1)
    v12, gp1, gz2 = D(p1, z2)
    if symmetric:
        v21, gp2, gz1 = D(p2, z1)
        value, grads = 0.5 * v12 + 0.5 * v21, [0.5 * gp1, 0.5 * gp2, 0.5 * gz1, 0.5 * gz2]
    else:
        value, grads = v12, [gp1, zero, zero, gz2]
    if stop_gradient:
        grads[2], grads[3] = zero, zero
    return value, grads


COMBOS = list(itertools.product(["cosine", "cross_entropy"], [True, False], [True, False]))


@pytest.mark.parametrize("similarity, symmetric, stop_gradient", COMBOS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loss_and_gradients_match_the_paper(similarity, symmetric, stop_gradient, dtype):
    g = torch.Generator().manual_seed(COMBOS.index((similarity, symmetric, stop_gradient)))
    arrays = [torch.randn(16, 24, generator=g, dtype=torch.float64) * 2 for _ in range(4)]
    tensors = [a.to(dtype).requires_grad_(True) for a in arrays]
    cfg = LossConfig(similarity=similarity, symmetric=symmetric, stop_gradient=stop_gradient)
    loss = simsiam_loss(*tensors, cfg)
    loss.backward()
    value, grads = paper_loss(*[t.detach().double().numpy() for t in tensors], similarity, symmetric,
                              stop_gradient)
    assert loss.item() == pytest.approx(value, abs=1e-6)
    for name, t, expected in zip(("p1", "p2", "z1", "z2"), tensors, grads, strict=True):
        got = np.zeros_like(expected) if t.grad is None else t.grad.double().numpy()
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0, err_msg=name)


def test_cosine_minimum_is_minus_one_and_ce_is_entropy_at_equal_inputs():
    z = torch.randn(8, 16)
    assert negative_cosine(3 * z, z).item() == pytest.approx(-1.0, abs=1e-6)
    s = torch.softmax(z, dim=1)
    assert cross_entropy(z, z).item() == pytest.approx(-(s * s.log()).sum(1).mean().item(), abs=1e-6)


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_stop_gradient_on_the_target_projection(stop_gradient):
    """Through the real model: the D(p1, z2) term sends gradient into z2 only without stop-gradient."""
    torch.manual_seed(0)
    model = SimSiam(ModelConfig(backbone="small", small_width=4, proj_layers=2, dim=16, pred_dim=4))
    cfg = LossConfig(stop_gradient=stop_gradient, symmetric=False)
    p1, p2, z1, z2 = model(torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8))
    (g_z2,) = torch.autograd.grad(simsiam_loss(p1, p2, z1, z2, cfg), z2, allow_unused=True)
    if stop_gradient:
        assert g_z2 is None
    else:
        assert g_z2 is not None and g_z2.abs().sum() > 0


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_stop_gradient_keeps_the_target_branch_out_of_the_update(stop_gradient):
    """One-sided loss D(p1, z2): view 2 is only a target, so its input (and its whole encoder pass)
    receives gradient only when stop-gradient is off."""
    torch.manual_seed(0)
    model = SimSiam(ModelConfig(backbone="small", small_width=4, proj_layers=2, dim=16, pred_dim=4))
    x1 = torch.randn(6, 3, 8, 8, requires_grad=True)
    x2 = torch.randn(6, 3, 8, 8, requires_grad=True)
    out = model(x1, x2)
    loss = simsiam_loss(out.p1, out.p2, out.z1, out.z2, LossConfig(stop_gradient=stop_gradient, symmetric=False))
    g1, g2 = torch.autograd.grad(loss, (x1, x2), allow_unused=True)
    assert g1 is not None and g1.abs().sum() > 0
    if stop_gradient:
        assert g2 is None
    else:
        assert g2 is not None and g2.abs().sum() > 0
