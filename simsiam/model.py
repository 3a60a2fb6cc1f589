"""SimSiam's networks: encoder f = backbone + projection MLP, and the prediction MLP h.

Each head is a flat ``nn.Sequential`` of fc blocks (Linear -> norm -> activation), written block by
block as the paper describes it. The paper's BN study (Table 3) is the config's ``model.bn``; it
becomes norm layers in one place, :data:`HEAD_NORMS`. (Flat, so the state-dict keys are
``projector.<i>.*`` / ``predictor.<i>.*`` as in every checkpoint written so far.)
"""
from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from typing import NamedTuple

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from simsiam.config import ModelConfig

Norm = Callable[[int], nn.Module] | None  # width -> the norm layer after an fc of that width; None: no norm


def batch_norm(d: int) -> nn.Module:
    return nn.BatchNorm1d(d)


def batch_norm_no_affine(d: int) -> nn.Module:
    """BN without learnable scale and shift: the projector's output BN in the reference code."""
    return nn.BatchNorm1d(d, affine=False)


class HeadNorms(NamedTuple):
    """The norm after each kind of fc in the heads, for one ``model.bn`` value."""

    hidden: Norm     # every hidden fc, of the projector and of the predictor
    proj_out: Norm   # the projector's output fc
    pred_out: Norm   # the predictor's output fc


# model.bn -> norms, the rows of the paper's Table 3 (linear top-1, ImageNet, 100 epochs).
HEAD_NORMS: dict[str, HeadNorms] = {
    # "default": the recipe (every projector fc, hidden predictor fc)
    "default": HeadNorms(hidden=batch_norm, proj_out=batch_norm_no_affine, pred_out=None),
    # "hidden": BN on hidden layers only, 67.4
    "hidden": HeadNorms(hidden=batch_norm, proj_out=None, pred_out=None),
    # "none": no BN in the MLPs, 34.6
    "none": HeadNorms(hidden=None, proj_out=None, pred_out=None),
    # "all": BN on the predictor's output too - training is unstable (fails)
    "pred_output": HeadNorms(hidden=batch_norm, proj_out=batch_norm_no_affine, pred_out=batch_norm),
}


def fc(d_in: int, d_out: int, norm: Norm, activation: nn.Module | None) -> list[nn.Module]:
    """One fc block: Linear -> [norm] -> [activation]. A Linear followed by a norm has no bias (BN's
    shift replaces it)."""
    layers: list[nn.Module] = [nn.Linear(d_in, d_out, bias=norm is None)]
    if norm is not None:
        layers.append(norm(d_out))
    if activation is not None:
        layers.append(activation)
    return layers


def projection_mlp(in_dim: int, cfg: ModelConfig) -> nn.Sequential:
    """Projection MLP (in f). Paper: "The projection MLP (in f) has BN applied to each fully-connected
    (fc) layer, including its output fc. Its output fc has no ReLU. The hidden fc is 2048-d. This MLP
    has 3 layers." (2 on CIFAR: ``model.proj_layers``.)"""
    norms = HEAD_NORMS[cfg.bn]
    hidden = cfg.proj_hidden_dim or cfg.dim
    dims = [in_dim] + [hidden] * (cfg.proj_layers - 1)
    layers: list[nn.Module] = []
    for d_in, d_out in pairwise(dims):  # "BN applied to each fc layer", hidden fc "2048-d"
        layers += fc(d_in, d_out, norms.hidden, nn.ReLU(inplace=True))
    # "including its output fc. Its output fc has no ReLU."
    layers += fc(dims[-1], cfg.dim, norms.proj_out, activation=None)
    return nn.Sequential(*layers)


def prediction_mlp(cfg: ModelConfig) -> nn.Sequential:
    """Prediction MLP h. Paper: "The prediction MLP (h) has BN applied to its hidden fc layers. Its output
    fc does not have BN or ReLU. This MLP has 2 layers. The dimension of h's input and output (z and p)
    is d = 2048, and h's hidden layer's dimension is 512, making h a bottleneck structure." """
    norms = HEAD_NORMS[cfg.bn]
    return nn.Sequential(
        *fc(cfg.dim, cfg.pred_dim, norms.hidden, nn.ReLU(inplace=True)),  # "BN applied to its hidden fc"
        *fc(cfg.pred_dim, cfg.dim, norms.pred_out, activation=None),       # "output fc does not have BN or ReLU"
    )


class SmallResNet(nn.Module):
    """A three-stage ResNet (one BasicBlock per stage, widths w, 2w, 4w) for CPU runs and tests."""

    def __init__(self, width: int = 32, zero_init_residual: bool = True):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))

        def down(c_in: int, c_out: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 1, 2, bias=False), nn.BatchNorm2d(c_out))

        self.layers = nn.Sequential(BasicBlock(w, w), BasicBlock(w, 2 * w, 2, down(w, 2 * w)),
                                    BasicBlock(2 * w, 4 * w, 2, down(2 * w, 4 * w)))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = 4 * w
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.layers(self.stem(x))), 1)


def build_backbone(cfg: ModelConfig) -> tuple[nn.Module, int]:
    """The backbone without its classifier, and its feature width (2048 for ResNet-50).

    torchvision ResNets keep torchvision's module names (fc replaced by Identity), so their
    state_dict loads into ``torchvision.models.resnetXX()`` with only fc missing."""
    if cfg.backbone == "small":
        net = SmallResNet(cfg.small_width, cfg.zero_init_residual)
        return net, net.out_dim
    net = getattr(torchvision.models, cfg.backbone)(weights=None, zero_init_residual=cfg.zero_init_residual)
    if cfg.cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feat_dim


class SimSiamOutput(NamedTuple):
    p1: torch.Tensor
    p2: torch.Tensor
    z1: torch.Tensor
    z2: torch.Tensor


class SimSiam(nn.Module):
    """f = projector(backbone(x)); h = predictor. ``forward`` returns predictions and projections of
    both views; the loss applies the stop-gradient to the projections (see :mod:`simsiam.loss`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.backbone, self.feat_dim = build_backbone(cfg)
        self.projector = projection_mlp(self.feat_dim, cfg)
        self.predictor: nn.Module = nn.Identity() if cfg.predictor == "none" else prediction_mlp(cfg)
        if cfg.predictor == "fixed":
            self.predictor.requires_grad_(False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """z = f(x): backbone then projector."""
        return self.projector(self.backbone(x))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> SimSiamOutput:
        # Separate passes: each view gets its own BN batch statistics, as in the reference code.
        z1, z2 = self.encode(x1), self.encode(x2)
        return SimSiamOutput(self.predictor(z1), self.predictor(z2), z1, z2)
