"""The SimSiam objective: L = D(p1, z2)/2 + D(p2, z1)/2 with D(p, z) = -cos(p, stopgrad(z))."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from simsiam.config import LossConfig


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) = -<p/|p|, z/|z|>, averaged over the batch (minimum -1)."""
    return -(F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(dim=1).mean()


def cross_entropy(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The paper's cross-entropy variant: D(p, z) = -softmax(z) . log softmax(p)."""
    return -(F.softmax(z, dim=1) * F.log_softmax(p, dim=1)).sum(dim=1).mean()


SIMILARITIES = {"cosine": negative_cosine, "cross_entropy": cross_entropy}


def targets(z: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """The target branch: stop-gradient is what keeps SimSiam from collapsing."""
    return z.detach() if cfg.stop_gradient else z


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor,
                 cfg: LossConfig) -> torch.Tensor:
    """Symmetric (default) or one-sided SimSiam loss. ``z1``/``z2`` are the target projections: the
    current network's, or a k-step-old network's in the paper's k-step variant."""
    D = SIMILARITIES[cfg.similarity]
    if cfg.symmetric:
        return 0.5 * D(p1, targets(z2, cfg)) + 0.5 * D(p2, targets(z1, cfg))
    return D(p1, targets(z2, cfg))
