"""The worker's epoch loop (simsiam/epoch.py) on the CPU, without Ray: records, the lr schedule, an exact
resume from the checkpoint state, and each way an epoch ends the run."""
from __future__ import annotations

import math

import pytest
import torch

from simsiam import config as C
from simsiam.epoch import EpochTrainer, RunStopped
from simsiam.model import SimSiam
from simsiam.optim import cosine_lr, scaled_lr
from simsiam.run import EpochRecord, Status

BATCH, SIZE, STEPS = 16, 16, 4


def _cfg(**overrides) -> C.Config:
    base = {"data.image_size": SIZE, "model.small_width": 8, "model.dim": 64, "model.pred_dim": 16,
            "optim.batch_size": BATCH, "train.epochs": 3, "train.log_every": 3, "train.max_steps_per_epoch": 0,
            "train.collapse_guard.enabled": False}
    return C.load("sample", {**base, **overrides})


def _batches(n: int = STEPS, seed: int = 0, batch: int = BATCH) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    g = torch.Generator().manual_seed(seed)
    views = lambda: torch.randint(0, 256, (batch, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)  # noqa: E731
    return [(views(), views(), 0) for _ in range(n)]


def _trainer(cfg: C.Config) -> EpochTrainer:
    torch.manual_seed(cfg.train.seed)
    return EpochTrainer(SimSiam(cfg.model), cfg, torch.device("cpu"), rank=0, world=1, num_rows=STEPS * BATCH)


def _same(a: EpochRecord, b: EpochRecord) -> bool:
    def timeless(r: EpochRecord) -> dict:
        return {k: v for k, v in r.to_dict().items() if k != "pairs_per_s"}  # pairs/s is wall-clock

    return timeless(a) == timeless(b)


def test_an_epoch_trains_every_batch_and_records_its_means():
    cfg = _cfg()
    t = _trainer(cfg)
    before = [p.detach().clone() for p in t.net.parameters()]
    rec = t.run_epoch(0, _batches())
    assert (rec.epoch, rec.step, rec.world_size, rec.global_batch, rec.skipped_images) == (1, STEPS, 1, BATCH, 0)
    assert -1.0 <= rec.loss <= 1.0 and rec.collapse_std > 0 and 1.0 <= rec.effective_rank <= BATCH
    assert rec.pairs_per_s > 0 and rec.knn_top1 is None
    # The lr of the epoch's last step, on the paper's schedule: base_lr x batch / 256, cosine over the epochs.
    init = scaled_lr(cfg.optim.base_lr, BATCH)
    assert rec.lr == pytest.approx(cosine_lr(init, (STEPS - 1) / STEPS, cfg.train.epochs, cfg.optim.warmup_epochs))
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(rec.lr)
    assert any(not torch.equal(a, b) for a, b in zip(before, t.net.parameters(), strict=True))
    assert t.run_epoch(1, _batches(seed=1)).step == 2 * STEPS


def test_max_steps_per_epoch_caps_the_epoch():
    t = _trainer(_cfg(**{"train.max_steps_per_epoch": 2}))
    assert t.run_epoch(0, _batches()).step == 2


def test_state_resumes_exactly():
    """Epoch 2 after restoring epoch 1's checkpoint state is epoch 2 of an uninterrupted run, bit for bit."""
    cfg = _cfg()
    full = _trainer(cfg)
    ref = [full.run_epoch(e, _batches(seed=e)) for e in range(2)]

    first = _trainer(cfg)
    rec = first.run_epoch(0, _batches(seed=0))
    state = first.state(0, [rec])
    resumed = _trainer(cfg)
    start, history = resumed.load_state(state)
    assert start == 1 and len(history) == 1 and _same(history[0], ref[0])
    assert _same(resumed.run_epoch(1, _batches(seed=1)), ref[1])
    for a, b in zip(full.net.state_dict().values(), resumed.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_non_finite_loss_ends_the_run_as_diverged():
    t = _trainer(_cfg(**{"optim.base_lr": 1e20}))
    with pytest.raises(RunStopped) as stop:
        for epoch in range(3):
            t.run_epoch(epoch, _batches(seed=epoch))
    assert stop.value.status == Status.DIVERGED
    assert "loss became" in stop.value.reason and "optim.base_lr" in stop.value.reason


def test_the_collapse_guard_ends_the_run_as_collapsed():
    # A threshold no batch reaches: the rank of a centred batch of 16 is at most 15 < 1.0 x min(16, d).
    t = _trainer(_cfg(**{"train.collapse_guard.enabled": True, "train.collapse_guard.window_steps": 2,
                         "train.collapse_guard.rank_ratio": 1.0}))
    with pytest.raises(RunStopped) as stop:
        t.run_epoch(0, _batches())
    assert stop.value.status == Status.COLLAPSED and "effective rank" in stop.value.reason
    assert t.guard.collapsed


def test_an_epoch_without_a_batch_fails_the_run():
    with pytest.raises(RunStopped) as stop:
        _trainer(_cfg()).run_epoch(0, [])
    assert stop.value.status == Status.FAILED and "no batch" in stop.value.reason


def test_skipped_images_are_counted_and_a_batch_too_small_for_bn_is_skipped():
    cfg = _cfg(**{"data.on_bad_image": "skip"})
    batches = _batches()
    v1, v2, _ = batches[1]
    batches[1] = (v1[:1], v2[:1], BATCH - 1)  # one image left: BN cannot train on it
    v1, v2, _ = batches[2]
    batches[2] = (v1[:10], v2[:10], BATCH - 10)
    rec = _trainer(cfg).run_epoch(0, batches)
    assert rec.step == STEPS - 1 and rec.skipped_images == (BATCH - 1) + (BATCH - 10)
    assert math.isfinite(rec.loss)
