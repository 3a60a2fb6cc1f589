"""SimSiam networks: backbones and stems, the projector/predictor layouts of each BN variant, predictors."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from simsiam.config import ModelConfig, OptimConfig
from simsiam.model import SimSiam, build_backbone
from simsiam.optim import build_optimizer


def small_cfg(**kw) -> ModelConfig:
    base = dict(backbone="small", small_width=8, proj_layers=2, dim=32, pred_dim=8)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("backbone, cifar_stem, feat_dim, size", [
    ("small", False, 4 * 8, 16),
    ("resnet18", False, 512, 64),
    ("resnet18", True, 512, 32),
    ("resnet34", True, 512, 32),
    ("resnet50", False, 2048, 64),
    ("resnet50", True, 2048, 32),
])
def test_forward_shapes(backbone, cifar_stem, feat_dim, size):
    torch.manual_seed(0)
    model = SimSiam(small_cfg(backbone=backbone, cifar_stem=cifar_stem, dim=48, pred_dim=12))
    assert model.feat_dim == feat_dim
    x1, x2 = torch.randn(2, 3, size, size), torch.randn(2, 3, size, size)
    out = model(x1, x2)
    for t in out:
        assert t.shape == (2, 48)
    assert model.backbone(x1).shape == (2, feat_dim)


def test_cifar_stem_is_3x3_stride1_without_maxpool():
    net, _ = build_backbone(ModelConfig(backbone="resnet18", cifar_stem=True))
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1) and net.conv1.bias is None
    assert isinstance(net.maxpool, nn.Identity)
    # 32 px input keeps 32 px through the stem, so layer4 sees 4x4 (ImageNet stem would give 1x1)
    x = net.relu(net.bn1(net.conv1(torch.randn(1, 3, 32, 32))))
    assert net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(x))))).shape[-2:] == (4, 4)
    plain, _ = build_backbone(ModelConfig(backbone="resnet18"))
    assert plain.conv1.kernel_size == (7, 7) and isinstance(plain.maxpool, nn.MaxPool2d)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_backbone_keeps_torchvision_names(name):
    net, _ = build_backbone(ModelConfig(backbone=name))
    ref = getattr(torchvision.models, name)().state_dict()
    assert set(net.state_dict()) == {k for k in ref if not k.startswith("fc.")}
    assert isinstance(net.fc, nn.Identity)


@pytest.mark.parametrize("name, block_bn", [("resnet18", "bn2"), ("resnet50", "bn3"), ("small", "bn2")])
def test_zero_init_residual(name, block_bn):
    for zero in (True, False):
        net, _ = build_backbone(small_cfg(backbone=name, zero_init_residual=zero))
        gammas = [getattr(m, block_bn).weight for m in net.modules() if hasattr(m, block_bn) and hasattr(m, "conv1")]
        assert gammas
        assert all(bool((g == 0).all()) == zero for g in gammas)


def layout(seq: nn.Sequential) -> list[str]:
    """Compact description: L(in,out,bias) / BN(affine) / BN0 (affine-free) / R."""
    out = []
    for m in seq:
        if isinstance(m, nn.Linear):
            out.append(f"L{m.in_features}-{m.out_features}{'b' if m.bias is not None else ''}")
        elif isinstance(m, nn.BatchNorm1d):
            out.append("BN" if m.affine else "BN0")
        elif isinstance(m, nn.ReLU):
            out.append("R")
        else:
            out.append(type(m).__name__)
    return out


@pytest.mark.parametrize("bn, projector, predictor", [
    # the paper: BN on every projector layer, output BN without affine; predictor BN on hidden only
    ("default", ["L32-64", "BN", "R", "L64-64", "BN", "R", "L64-48", "BN0"],
     ["L48-12", "BN", "R", "L12-48b"]),
    ("hidden", ["L32-64", "BN", "R", "L64-64", "BN", "R", "L64-48b"], ["L48-12", "BN", "R", "L12-48b"]),
    ("none", ["L32-64b", "R", "L64-64b", "R", "L64-48b"], ["L48-12b", "R", "L12-48b"]),
    ("pred_output", ["L32-64", "BN", "R", "L64-64", "BN", "R", "L64-48", "BN0"],
     ["L48-12", "BN", "R", "L12-48", "BN"]),
])
def test_bn_placement_per_variant(bn, projector, predictor):
    m = SimSiam(small_cfg(bn=bn, proj_layers=3, proj_hidden_dim=64, dim=48, pred_dim=12))
    assert layout(m.projector) == projector
    assert layout(m.predictor) == predictor


def test_widths_are_configurable():
    m = SimSiam(small_cfg(small_width=4, proj_layers=1, dim=20, pred_dim=5))
    assert m.feat_dim == 16
    assert layout(m.projector) == ["L16-20", "BN0"]
    assert layout(m.predictor) == ["L20-5", "BN", "R", "L5-20b"]
    # proj_hidden_dim 0 means "same as dim"
    assert layout(SimSiam(small_cfg(proj_layers=2, dim=24)).projector)[:2] == ["L32-24", "BN"]


def test_predictor_none_is_identity():
    torch.manual_seed(0)
    m = SimSiam(small_cfg(predictor="none"))
    assert isinstance(m.predictor, nn.Identity)
    p1, p2, z1, z2 = m(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))
    assert torch.equal(p1, z1) and torch.equal(p2, z2)
    assert len(build_optimizer(m, OptimConfig()).param_groups) == 1


def test_fixed_predictor_never_changes():
    torch.manual_seed(0)
    m = SimSiam(small_cfg(predictor="fixed"))
    assert not any(p.requires_grad for p in m.predictor.parameters())
    before = {k: v.clone() for k, v in m.predictor.named_parameters()}
    enc_before = m.projector[0].weight.clone()
    opt = build_optimizer(m, OptimConfig(weight_decay=1e-2, batch_size=8))
    assert [g["name"] for g in opt.param_groups] == ["encoder"]
    for _ in range(3):
        p1, p2, z1, z2 = m(torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16))
        loss = -(nn.functional.cosine_similarity(p1, z2.detach()).mean() +
                 nn.functional.cosine_similarity(p2, z1.detach()).mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in m.predictor.named_parameters():
        assert torch.equal(v, before[k]), k
        assert v.grad is None
    assert not torch.equal(m.projector[0].weight, enc_before)  # the rest of the model did train


def test_learned_predictor_trains():
    torch.manual_seed(0)
    m = SimSiam(small_cfg())
    assert all(p.requires_grad for p in m.parameters())
    w = m.predictor[0].weight.clone()
    opt = build_optimizer(m, OptimConfig(batch_size=8))
    p1, p2, z1, z2 = m(torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16))
    (-(nn.functional.cosine_similarity(p1, z2.detach()).mean())).backward()
    opt.step()
    assert not torch.equal(m.predictor[0].weight, w)


def test_views_use_their_own_bn_statistics():
    """Each view gets its own forward pass, so view 2 cannot change view 1's BN-normalised output."""
    torch.manual_seed(0)
    m = SimSiam(small_cfg())
    x1 = torch.randn(4, 3, 16, 16)
    a = m(x1, torch.randn(4, 3, 16, 16)).z1
    b = m(x1, torch.randn(4, 3, 16, 16) * 5).z1
    torch.testing.assert_close(a, b)
