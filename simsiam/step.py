"""One SimSiam forward pass from uint8 views to the loss, independent of Ray.

The Ray Train loop (:mod:`simsiam.train`) and the GPU/overhead benchmarks share it, so what is
measured is what trains."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from simsiam.augment import PhotometricAugment
from simsiam.checkpoint import unwrap
from simsiam.config import Config
from simsiam.loss import simsiam_loss
from simsiam.metrics import centred_gram, collapse_std_tensor, ranks_from_grams


class SimSiamStep:
    """Photometric augmentation on the batch's device, forward under bf16 autocast on GPU, loss.

    ``model`` may be DDP-wrapped; ``net`` is the bare :class:`~simsiam.model.SimSiam`. With
    ``loss.target_refresh_steps = k > 1`` (the paper's k-step variant) the targets come from a copy of
    the encoder refreshed every k steps instead of the current one."""

    def __init__(self, model: nn.Module, cfg: Config, device: torch.device):
        self.model, self.net, self.cfg, self.device = model, unwrap(model), cfg, device
        on_gpu = device.type == "cuda"
        self.amp = on_gpu and cfg.train.amp
        self.channels_last = on_gpu and cfg.train.channels_last
        self.augment = PhotometricAugment(cfg.data).to(device)
        self.k = cfg.loss.target_refresh_steps
        self.target_encoder = (copy.deepcopy(self._encoder()).requires_grad_(False) if self.k > 1 else None)

    def _encoder(self) -> nn.Module:
        return nn.Sequential(self.net.backbone, self.net.projector)

    def views(self, v1: torch.Tensor, v2: torch.Tensor, generator: torch.Generator | None) -> tuple:
        x1, x2 = self.augment(v1, generator=generator), self.augment(v2, generator=generator)
        if self.channels_last:
            x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
        return x1, x2

    def __call__(self, v1: torch.Tensor, v2: torch.Tensor, generator: torch.Generator | None = None,
                 step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss (a graph to backpropagate) and the first view's projections (detached, float32)."""
        x1, x2 = self.views(v1, v2, generator)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.model(x1, x2)
        p1, p2, z1, z2 = (t.float() for t in out)
        t1, t2 = z1, z2
        if self.target_encoder is not None:
            if step % self.k == 0:
                self.target_encoder.load_state_dict(self._encoder().state_dict())
            with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                t1, t2 = self.target_encoder(x1).float(), self.target_encoder(x2).float()
        return simsiam_loss(p1, p2, t1, t2, self.cfg.loss), z1.detach()


class StepMetrics:
    """Loss and both collapse metrics of every step, queued on the device and read back in windows
    (every ``train.log_every`` steps and at epoch end): one host sync per window instead of several per
    step, which cost 12% of a ResNet-50 step on an H200. Read-back values are averaged over workers, so
    every rank takes the same stop decisions at the same step. The effective rank is measured on the
    batch's first ``rank_rows`` rows (:func:`simsiam.metrics.rank_threshold` says why)."""

    def __init__(self, device: torch.device, world: int, rank_rows: int):
        self.device, self.world, self.rank_rows = device, world, rank_rows
        self._rows: list[tuple] = []

    def add(self, step: int, loss: torch.Tensor, z: torch.Tensor, lr: float) -> None:
        self._rows.append((step, lr, z.shape[0], loss.detach().double(), collapse_std_tensor(z),
                           centred_gram(z[:self.rank_rows])))

    def flush(self) -> list[dict]:
        if not self._rows:
            return []
        rows, self._rows = self._rows, []
        grams = [r[5] for r in rows]
        if all(g[0].shape == grams[0][0].shape for g in grams):
            ranks = ranks_from_grams(torch.stack([g[0] for g in grams]), torch.stack([g[1] for g in grams]))
        else:  # batches of different sizes (bad images skipped): one decomposition each
            ranks = torch.cat([ranks_from_grams(g.unsqueeze(0), t.reshape(1)) for g, t in grams])
        losses, stds = torch.stack([r[3] for r in rows]), torch.stack([r[4] for r in rows]).double()
        vals = torch.stack([losses, stds, ranks], dim=1)
        if self.world > 1:
            dist.all_reduce(vals)
            vals /= self.world
        return [{"step": r[0], "lr": r[1], "batch": r[2], "loss": v[0], "collapse_std": v[1], "effective_rank": v[2]}
                for r, v in zip(rows, vals.tolist(), strict=True)]
