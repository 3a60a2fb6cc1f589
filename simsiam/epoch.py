"""One worker's SimSiam training, one epoch at a time, free of Ray.

:class:`EpochTrainer` holds a worker's training state (model, optimiser, lr schedule, collapse guard,
photometric RNG, step count) and runs one epoch over any iterable of ``(view1, view2, n_skipped)`` uint8
batches: in a Ray Train worker the batches come from the worker's dataset shard
(:mod:`simsiam.train`), in a unit test from a list. An epoch that ends the run (a non-finite loss, a
collapse, no batch at all) raises :class:`RunStopped`; a finished one returns its
:class:`~simsiam.run.EpochRecord`.

Multi-worker (DDP) runs call the same methods in the same order on every rank: the only collectives are
the metric windows' all-reduce (every ``train.log_every`` steps), the end-of-epoch averages and, under
``data.on_bad_image: skip``, the per-step check that no rank's batch became too small for BN.
"""
from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from simsiam import checkpoint as ckpt_io
from simsiam.config import Config
from simsiam.metrics import CollapseGuard
from simsiam.optim import build_optimizer, cosine_lr, scaled_lr, set_lr
from simsiam.run import EpochRecord, Status
from simsiam.step import SimSiamStep, StepMetrics

STEP_SCALARS = ("loss", "collapse_std", "effective_rank")


class RunStopped(Exception):
    """The run ends before its last epoch: ``status`` (collapsed, diverged, failed) and ``reason``."""

    def __init__(self, status: Status, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def stable_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any parts (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def all_min(value: int, device: torch.device, world: int) -> int:
    """The smallest ``value`` over all workers."""
    t = torch.tensor([value], device=device)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def all_mean(values: list[float], device: torch.device, world: int) -> list[float]:
    """Average per-worker scalars over all workers, so every rank takes the same decisions."""
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return t.tolist()


@dataclass
class _EpochSums:
    """Running totals of one epoch on one worker."""

    loss: float = 0.0
    collapse_std: float = 0.0
    effective_rank: float = 0.0
    steps: int = 0
    pairs: int = 0
    skipped: int = 0
    lr: float = 0.0


class EpochTrainer:
    """One worker's training state and its epoch loop (see the module docstring).

    ``model`` may be DDP-wrapped. The lr follows the global batch (per-worker batch x live workers) by the
    paper's rule and a cosine schedule positioned by epoch, so a resized or resumed run keeps its place.
    ``tb`` (rank 0) receives every step's scalars as they are read back."""

    def __init__(self, model: nn.Module, cfg: Config, device: torch.device, rank: int, world: int, num_rows: int,
                 tb: Any | None = None):
        self.model, self.net, self.cfg, self.device = model, ckpt_io.unwrap(model), cfg, device
        self.rank, self.world, self.tb = rank, world, tb
        self.per_worker_batch = cfg.per_worker_batch
        self.global_batch = self.per_worker_batch * world
        self.init_lr = scaled_lr(cfg.optim.base_lr, self.global_batch)
        self.optimizer = build_optimizer(self.net, cfg.optim, self.global_batch)
        self.steps_per_epoch = max(1, num_rows // self.global_batch)
        if cfg.train.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.train.max_steps_per_epoch)
        self.guard = CollapseGuard(cfg.train.collapse_guard, cfg.model.dim)
        self.step_fn = SimSiamStep(model, cfg, device)
        self.gen = torch.Generator(device=device)
        self.window = StepMetrics(device, world, cfg.train.collapse_guard.rank_rows)
        self.step = 0

    # ------------------------------------------------------------------ checkpoint state

    def state(self, epoch: int, history: list[EpochRecord]) -> dict[str, Any]:
        """The checkpoint after ``epoch`` (0-based): weights, optimiser, position, RNG, guard, history."""
        extra = {"history": [r.to_dict() for r in history], "guard": self.guard.state_dict()}
        return ckpt_io.state(self.net, self.optimizer, epoch, self.step, self.cfg, extra=extra)

    def load_state(self, state: dict[str, Any]) -> tuple[int, list[EpochRecord]]:
        """Resume from :meth:`state`'s dict; returns (the next epoch, the history so far)."""
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.guard.load_state_dict(state["extra"].get("guard", {}))
        ckpt_io.restore_rng(state)
        return state["epoch"] + 1, [EpochRecord.from_dict(r) for r in state["extra"].get("history", [])]

    # ------------------------------------------------------------------ the epoch

    def run_epoch(self, epoch: int, batches: Iterable[tuple[torch.Tensor, torch.Tensor, int]]) -> EpochRecord:
        """Train one epoch (0-based) over ``batches``; raises :class:`RunStopped` when the run must end."""
        cfg = self.cfg.train
        self.model.train()
        # Photometric randomness keyed by (seed, rank, epoch): a resumed epoch draws what it would have.
        self.gen.manual_seed(stable_seed(cfg.seed, self.rank, epoch))
        skip_small = self.cfg.data.on_bad_image == "skip"
        sums = _EpochSums()
        t0 = time.perf_counter()
        for i, (v1, v2, n_skip) in enumerate(batches):
            if cfg.max_steps_per_epoch and i >= cfg.max_steps_per_epoch:
                break
            sums.skipped += n_skip
            if skip_small and all_min(v1.shape[0], self.device, self.world) < 2:
                continue  # skipped images left a batch too small for BN somewhere: every rank skips it
            sums.lr = self._train_step(epoch + min(i / self.steps_per_epoch, 1.0), v1, v2)
            sums.steps += 1
            sums.pairs += v1.shape[0]
            if self.step % cfg.log_every == 0:
                self._account(self.window.flush(), sums, epoch)
        self._account(self.window.flush(), sums, epoch)
        elapsed = time.perf_counter() - t0
        if sums.steps == 0:
            raise RunStopped(Status.FAILED, f"epoch {epoch + 1} produced no batch: fewer rows than one batch?")
        return self._record(epoch, sums, elapsed)

    def _train_step(self, position: float, v1: torch.Tensor, v2: torch.Tensor) -> float:
        """One optimiser step at fractional epoch ``position``; returns its lr."""
        lr = cosine_lr(self.init_lr, position, self.cfg.train.epochs, self.cfg.optim.warmup_epochs)
        set_lr(self.optimizer, lr, self.init_lr)
        loss, z1 = self.step_fn(v1, v2, self.gen, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        self.window.add(self.step, loss, z1, lr)
        return lr

    def _account(self, rows: list[dict], sums: _EpochSums, epoch: int) -> None:
        """Add read-back steps to the epoch's sums; the first non-finite or collapsed one ends the run."""
        for r in rows:
            if not all(math.isfinite(r[k]) for k in STEP_SCALARS):
                raise RunStopped(Status.DIVERGED, (
                    f"loss became {r['loss']} at epoch {epoch + 1}, step {r['step']}: the run stopped and its last "
                    f"good checkpoint is kept (try a lower optim.base_lr than {self.cfg.optim.base_lr})"))
            sums.loss += r["loss"]
            sums.collapse_std += r["collapse_std"]
            sums.effective_rank += r["effective_rank"]
            if self.tb is not None:
                self.tb.scalars({f"train/{k}": r[k] for k in (*STEP_SCALARS, "lr")}, r["step"])
            if self.guard.update(r["collapse_std"], r["effective_rank"], r["batch"]):
                raise RunStopped(Status.COLLAPSED, self.guard.reason)

    def _record(self, epoch: int, sums: _EpochSums, elapsed: float) -> EpochRecord:
        pairs, skipped = all_mean([float(sums.pairs), float(sums.skipped)], self.device, self.world)
        n = sums.steps
        return EpochRecord(epoch=epoch + 1, step=self.step, loss=sums.loss / n, collapse_std=sums.collapse_std / n,
                           effective_rank=sums.effective_rank / n, lr=sums.lr,
                           pairs_per_s=pairs * self.world / max(elapsed, 1e-9),
                           skipped_images=int(round(skipped * self.world)), world_size=self.world,
                           global_batch=self.global_batch)
