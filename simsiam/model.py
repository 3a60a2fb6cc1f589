"""SimSiam's networks: encoder f = backbone + projection MLP, and the prediction MLP h.

Heads are built from short lists of ``(in, out, norm, relu)`` blocks so that the paper's BN
ablations (Table 4) and widths are data, not code paths.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from simsiam.config import ModelConfig

# norm: None (Linear keeps its bias), "bn" (affine BN), "bn0" (BN without learnable affine).
Block = tuple[int, int, "str | None", bool]


def mlp(blocks: list[Block]) -> nn.Sequential:
    """Linear -> [BN] -> [ReLU] per block. A Linear followed by BN has no bias (BN's shift replaces it)."""
    layers: list[nn.Module] = []
    for d_in, d_out, norm, relu in blocks:
        layers.append(nn.Linear(d_in, d_out, bias=norm is None))
        if norm is not None:
            layers.append(nn.BatchNorm1d(d_out, affine=(norm == "bn")))
        if relu:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def projector_blocks(in_dim: int, cfg: ModelConfig) -> list[Block]:
    """Projection MLP. Paper: "The projection MLP (in f) has BN applied to each fully-connected (fc)
    layer, including its output fc. Its output fc has no ReLU. The hidden fc is 2048-d. This MLP has
    3 layers." The output BN has no learnable affine (reference code)."""
    hidden = cfg.proj_hidden_dim or cfg.dim
    hidden_norm = None if cfg.bn == "none" else "bn"
    out_norm = "bn0" if cfg.bn in ("default", "pred_output") else None
    dims = [in_dim] + [hidden] * (cfg.proj_layers - 1) + [cfg.dim]
    blocks: list[Block] = [(dims[i], dims[i + 1], hidden_norm, True) for i in range(cfg.proj_layers - 1)]
    return blocks + [(dims[-2], cfg.dim, out_norm, False)]


def predictor_blocks(cfg: ModelConfig) -> list[Block]:
    """Prediction MLP. Paper: "The prediction MLP (h) has BN applied to its hidden fc layers. Its output
    fc does not have BN or ReLU. This MLP has 2 layers. The dimension of h's input and output (z and p)
    is d = 2048, and h's hidden layer's dimension is 512, making h a bottleneck structure." """
    hidden_norm = None if cfg.bn == "none" else "bn"
    out_norm = "bn" if cfg.bn == "pred_output" else None
    return [(cfg.dim, cfg.pred_dim, hidden_norm, True), (cfg.pred_dim, cfg.dim, out_norm, False)]


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
        self.projector = mlp(projector_blocks(self.feat_dim, cfg))
        self.predictor: nn.Module = nn.Identity() if cfg.predictor == "none" else mlp(predictor_blocks(cfg))
        if cfg.predictor == "fixed":
            self.predictor.requires_grad_(False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """z = f(x): backbone then projector."""
        return self.projector(self.backbone(x))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> SimSiamOutput:
        # Separate passes: each view gets its own BN batch statistics, as in the reference code.
        z1, z2 = self.encode(x1), self.encode(x2)
        return SimSiamOutput(self.predictor(z1), self.predictor(z2), z1, z2)
