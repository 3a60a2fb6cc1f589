"""lr scaling, cosine schedule and warm-up, the predictor's fixed lr, and LARS against a hand computation."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from simsiam.config import ModelConfig, OptimConfig
from simsiam.model import SimSiam
from simsiam.optim import LARS, build_optimizer, cosine_lr, scaled_lr, set_lr


def tiny_model(**kw) -> SimSiam:
    return SimSiam(ModelConfig(backbone="small", small_width=4, proj_layers=2, dim=16, pred_dim=4, **kw))


def test_lr_scales_with_the_global_batch():
    assert scaled_lr(0.05, 256) == pytest.approx(0.05)
    assert scaled_lr(0.05, 512) == pytest.approx(0.1)
    m = tiny_model()
    cfg = OptimConfig(base_lr=0.05, batch_size=512)
    assert build_optimizer(m, cfg).param_groups[0]["lr"] == pytest.approx(0.1)
    # 4 workers x 256 each: the global batch sets the lr, not the per-worker one
    assert build_optimizer(m, cfg, global_batch=1024).param_groups[0]["lr"] == pytest.approx(0.2)


def test_optimizer_groups_cover_every_parameter_once():
    m = tiny_model()
    opt = build_optimizer(m, OptimConfig(weight_decay=1e-4, momentum=0.9))
    enc, pred = opt.param_groups
    assert enc["name"] == "encoder" and pred["name"] == "predictor"
    assert {id(p) for p in pred["params"]} == {id(p) for p in m.predictor.parameters()}
    all_ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in m.parameters())
    # weight decay on all parameters, BN included (the paper's recipe)
    bn_weight = m.projector[1].weight
    assert any(p is bn_weight for p in enc["params"]) and enc["weight_decay"] == 1e-4
    assert enc["momentum"] == 0.9


def test_cosine_endpoints_and_midpoint():
    assert cosine_lr(0.1, 0, 100) == pytest.approx(0.1)
    assert cosine_lr(0.1, 50, 100) == pytest.approx(0.05)
    assert cosine_lr(0.1, 100, 100) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(0.1, 25, 100) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert cosine_lr(0.1, 150, 100) == pytest.approx(0.0, abs=1e-12)  # past the end stays at 0


def test_warmup_then_cosine():
    lr, warm, total = 0.8, 10, 110
    assert cosine_lr(lr, 0, total, warm) == pytest.approx(0.0, abs=1e-8)
    assert cosine_lr(lr, 5, total, warm) == pytest.approx(0.4)
    assert cosine_lr(lr, 10, total, warm) == pytest.approx(0.8)
    assert cosine_lr(lr, 60, total, warm) == pytest.approx(0.4)  # cosine runs over the post-warm-up span
    assert cosine_lr(lr, 110, total, warm) == pytest.approx(0.0, abs=1e-12)
    lrs = [cosine_lr(lr, e / 4, total, warm) for e in range(0, 41)]
    assert lrs == sorted(lrs)  # warm-up is monotone


@pytest.mark.parametrize("fix_pred_lr", [True, False])
def test_fix_pred_lr_keeps_the_predictor_constant(fix_pred_lr):
    m = tiny_model()
    opt = build_optimizer(m, OptimConfig(base_lr=0.05, batch_size=256, fix_pred_lr=fix_pred_lr))
    init = opt.param_groups[0]["lr"]
    seen = []
    for epoch in (0, 25, 50, 99.5):
        lr = cosine_lr(init, epoch, 100)
        set_lr(opt, lr, init)
        enc, pred = opt.param_groups
        assert enc["lr"] == pytest.approx(lr)
        seen.append(pred["lr"])
    if fix_pred_lr:
        assert seen == [init] * 4
    else:
        assert seen[-1] < 0.01 * init


def test_lars_step_matches_hand_computation():
    w0 = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    b0 = torch.tensor([0.5, -0.5])
    layer = nn.Linear(3, 2).double()  # float64 so the comparison is exact up to rounding
    with torch.no_grad():
        layer.weight.copy_(w0)
        layer.bias.copy_(b0)
    lr, wd, mom, tc = 0.5, 0.01, 0.9, 0.001
    opt = LARS(layer.parameters(), lr=lr, weight_decay=wd, momentum=mom, trust_coefficient=tc)
    grads_w = [torch.tensor([[0.1, 0.2, -0.3], [0.4, -0.5, 0.6]]), torch.tensor([[-0.2, 0.1, 0.0], [0.3, 0.3, -0.1]])]
    grads_b = [torch.tensor([0.7, -0.8]), torch.tensor([0.1, 0.2])]

    w, b = w0.clone().double(), b0.clone().double()
    buf_w, buf_b = torch.zeros_like(w), torch.zeros_like(b)
    for gw, gb in zip(grads_w, grads_b, strict=True):
        layer.weight.grad, layer.bias.grad = gw.double(), gb.double()
        opt.step()
        # by hand, as apex LARC(clip=False): every parameter, the bias too, gets weight decay and the
        # trust ratio tc * |p| / (|g| + wd |p| + eps)
        d_w = (gw.double() + wd * w) * (tc * w.norm() / (gw.double().norm() + wd * w.norm() + 1e-8))
        d_b = (gb.double() + wd * b) * (tc * b.norm() / (gb.double().norm() + wd * b.norm() + 1e-8))
        buf_w, buf_b = mom * buf_w + d_w, mom * buf_b + d_b
        w, b = w - lr * buf_w, b - lr * buf_b
        torch.testing.assert_close(layer.weight.double(), w, atol=1e-12, rtol=0)
        torch.testing.assert_close(layer.bias.double(), b, atol=1e-12, rtol=0)


def test_lars_zero_initialised_bias_takes_a_plain_first_step_then_is_scaled():
    """The official linear head starts with bias 0: LARC leaves such a parameter's first step unscaled."""
    b = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = LARS([b], lr=0.1, momentum=0.0)
    b.grad = torch.tensor([1.0, -1.0], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(b.detach(), torch.tensor([-0.1, 0.1], dtype=torch.float64))
    opt.step()  # now |b| > 0: scaled by 0.001 * |b| / |g|
    torch.testing.assert_close(b.detach(), torch.tensor([-0.1, 0.1], dtype=torch.float64) * (1 + 0.1 * 0.001))


def test_lars_zero_weights_fall_back_to_plain_step():
    p = nn.Parameter(torch.zeros(2, 2))
    opt = LARS([p], lr=0.1, momentum=0.0)
    p.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((2, 2), -0.1))
    with pytest.raises(ValueError, match="lr"):
        LARS([p], lr=0.0)
