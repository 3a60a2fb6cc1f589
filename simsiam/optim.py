"""Optimisation: SGD with the paper's lr scaling and cosine schedule, and LARS for linear evaluation."""
from __future__ import annotations

import math

import torch
from torch import nn

from simsiam.checkpoint import unwrap
from simsiam.config import OptimConfig


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """lr = base_lr x GLOBAL batch / 256 (the reference code scales by the per-node batch; we don't)."""
    return base_lr * global_batch / 256


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch: int | None = None) -> torch.optim.SGD:
    """SGD over the encoder and the (learned) predictor, each in its own group.

    The predictor group carries ``fix_lr`` so :func:`set_lr` can keep it constant (paper: 68.1 vs 67.7).
    A frozen predictor (``model.predictor: fixed``) has no trainable parameters and is left out."""
    unwrapped = unwrap(model)
    pred_ids = {id(p) for p in unwrapped.predictor.parameters()}
    encoder = [p for p in unwrapped.parameters() if p.requires_grad and id(p) not in pred_ids]
    predictor = [p for p in unwrapped.predictor.parameters() if p.requires_grad]
    lr = scaled_lr(cfg.base_lr, global_batch or cfg.batch_size)
    groups = [{"params": encoder, "fix_lr": False, "name": "encoder"}]
    if predictor:
        groups.append({"params": predictor, "fix_lr": cfg.fix_pred_lr, "name": "predictor"})
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def cosine_lr(init_lr: float, epoch: float, total_epochs: int, warmup_epochs: float = 0.0) -> float:
    """Linear warm-up for ``warmup_epochs``, then cosine decay to 0 at ``total_epochs``.
    ``epoch`` is fractional (step / steps_per_epoch) so the schedule is smooth within an epoch."""
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return init_lr * (epoch + 1e-8) / warmup_epochs
    span = max(total_epochs - warmup_epochs, 1e-8)
    return init_lr * 0.5 * (1.0 + math.cos(math.pi * min((epoch - warmup_epochs) / span, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float, init_lr: float) -> None:
    """Apply the scheduled lr; groups marked ``fix_lr`` keep ``init_lr``."""
    for group in optimizer.param_groups:
        group["lr"] = init_lr if group.get("fix_lr") else lr


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017) exactly as NVIDIA apex's ``LARC(SGD(...),
    trust_coefficient=0.001, clip=False)``, which the official SimSiam linear evaluation
    (``main_lincls.py --lars``) wraps around SGD over ``fc.weight`` and ``fc.bias``.

    Every parameter, bias included, gets the trust ratio
    ``trust_coefficient * |p| / (|g| + weight_decay * |p| + eps)`` (1 where ``|p|`` or ``|g|`` is 0, so
    the zero-initialised bias takes a plain first step) applied to ``g + weight_decay * p``, then
    momentum SGD. Unlike LARS as usually written for pretraining (LAMB/BYOL style), biases are not
    exempt: matching LARC keeps the paper's linear protocol (lr 0.1 x 4096/256) reproducible."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001, eps: float = 1e-8):
        if lr <= 0:
            raise ValueError(f"LARS lr must be > 0, got {lr}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            wd = g["weight_decay"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                trust = torch.where((w_norm > 0) & (g_norm > 0),
                                    g["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + g["eps"]),
                                    torch.ones_like(w_norm))
                d = p.grad.add(p, alpha=wd).mul_(trust)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])
        return loss
