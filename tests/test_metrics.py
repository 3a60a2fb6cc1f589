"""Collapse metrics, the collapse guard, kNN and top-k accuracy."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simsiam.config import CollapseGuardConfig
from simsiam.metrics import (
    CollapseGuard,
    collapse_std,
    collapse_verdict,
    effective_rank,
    healthy_std,
    knn_accuracy,
    knn_predict,
    rank_threshold,
    topk_accuracy,
    topk_correct,
)
from simsiam.step import StepMetrics


def test_healthy_std_is_inverse_sqrt_dim():
    assert healthy_std(2048) == pytest.approx(1 / math.sqrt(2048))
    with pytest.raises(ValueError):
        healthy_std(0)


def test_collapse_std_spread_outputs_near_healthy():
    torch.manual_seed(0)
    z = torch.randn(4096, 64)
    assert collapse_std(z) == pytest.approx(healthy_std(64), rel=0.02)


def test_collapse_std_matches_direct_formula():
    torch.manual_seed(1)
    z = torch.randn(50, 20, dtype=torch.float64) * 3 + 1
    zn = z.numpy() / np.linalg.norm(z.numpy(), axis=1, keepdims=True)
    assert collapse_std(z) == pytest.approx(zn.std(axis=0, ddof=1).mean(), rel=1e-6)


def test_collapse_std_zero_when_all_outputs_share_a_direction():
    torch.manual_seed(0)
    direction = torch.randn(1, 32)
    scales = torch.rand(64, 1) + 0.5  # different lengths, same direction: collapsed after l2-normalising
    assert collapse_std(direction * scales) == pytest.approx(0.0, abs=1e-6)


def test_metrics_reject_a_single_sample():
    with pytest.raises(ValueError, match="at least 2"):
        collapse_std(torch.randn(1, 8))
    with pytest.raises(ValueError, match="batch, dim"):
        effective_rank(torch.randn(8))


def _rankme_numpy(z: np.ndarray) -> float:
    s = np.linalg.svd(z - z.mean(axis=0, keepdims=True), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def test_effective_rank_matches_direct_rankme():
    torch.manual_seed(0)
    z = torch.randn(128, 40) @ torch.diag(torch.linspace(0.1, 3.0, 40))
    assert effective_rank(z) == pytest.approx(_rankme_numpy(z.double().numpy()), rel=1e-4)


def test_effective_rank_full_low_and_zero():
    torch.manual_seed(0)
    assert effective_rank(torch.randn(2000, 16)) > 15.5  # isotropic: close to the dimension
    low = torch.randn(256, 3) @ torch.randn(3, 64)  # exactly rank 3
    assert 2.0 < effective_rank(low) <= 3.0 + 1e-4
    constant = (torch.randn(1, 16) * 3 + 5).expand(64, 16)
    assert effective_rank(constant) == 0.0  # float rounding noise after centring is not "rank"


def test_effective_rank_is_scale_invariant_and_accepts_bf16():
    torch.manual_seed(0)
    z = torch.randn(64, 32)
    assert effective_rank(z * 100) == pytest.approx(effective_rank(z), rel=1e-4)
    assert effective_rank(z.bfloat16()) == pytest.approx(effective_rank(z), rel=0.02)


def test_rank_sees_dimensional_collapse_that_the_std_misses():
    """The projector's affine-free BN output keeps per-channel variance at 1, so the std metric stays
    healthy on a batch spanning only 3 directions; the effective rank shows the collapse."""
    torch.manual_seed(0)
    z = F.batch_norm(torch.randn(256, 3) @ torch.randn(3, 512), None, None, training=True)
    assert collapse_std(z) == pytest.approx(healthy_std(512), rel=0.05)
    assert effective_rank(z) < 3.01


# --------------------------------------------------------------------------- CollapseGuard

CFG = CollapseGuardConfig(enabled=True, std_ratio=0.5, rank_ratio=0.2, window_steps=3)
D = 64  # std threshold 0.5/8 = 0.0625; rank threshold at batch 128: 0.2 * 64 = 12.8
GOOD = (0.12, 40.0)


def test_guard_trips_after_window_of_low_rank_and_names_it():
    g = CollapseGuard(CFG, D)
    assert g.thresholds(128) == pytest.approx((0.0625, 12.8))
    assert not g.update(*GOOD, 128)
    assert not g.update(0.12, 5.0, 128)
    assert not g.update(0.12, 5.0, 128)
    assert g.update(0.12, 5.0, 128)
    assert "effective rank" in g.reason and "12.8" in g.reason and "5" in g.reason
    assert g.update(*GOOD, 128)  # latched: a collapsed run stays stopped


def test_guard_trips_on_std_alone():
    g = CollapseGuard(CFG, D)
    assert [g.update(0.01, 40.0, 128) for _ in range(3)] == [False, False, True]
    assert "std" in g.reason and "0.0625" in g.reason and "0.01" in g.reason


def test_guard_needs_consecutive_steps_and_uses_min_of_rows_and_dim():
    g = CollapseGuard(CFG, D)
    for _ in range(10):  # alternating low/high never completes a window
        assert not g.update(0.12, 5.0, 128)
        assert not g.update(*GOOD, 128)
    # batch 16 < rank_rows: the rank is measured on 16 rows, threshold 0.2 * 16 = 3.2, so rank 5 is healthy
    assert not any(g.update(0.12, 5.0, 16) for _ in range(10))


def test_rank_threshold_does_not_grow_with_the_batch():
    """Measured on the sample's default model (d 512) at its last epoch: effective rank 28 over 64 rows,
    88 over 512, 101 over 4096, while the no-stop-gradient run stays at 1.4-1.7 at any row count. A
    threshold scaled with the batch (0.2 x min(batch, d): 102.4 from batch 512 on) called every healthy
    large-batch run collapsed; measured on a fixed 64 rows, the threshold is 12.8 at every batch."""
    cfg = CollapseGuardConfig()
    assert cfg.rank_rows == 64
    assert [rank_threshold(cfg, b, 512)[0] for b in (64, 512, 4096)] == pytest.approx([12.8] * 3)
    assert rank_threshold(cfg, 32, 512) == pytest.approx((6.4, "0.2 x min(rows 32, d 512)"))
    assert rank_threshold(cfg, 4096, 16)[0] == pytest.approx(3.2)  # d under the rows bounds the rank
    assert CollapseGuard(cfg, 512).thresholds(4096)[1] == pytest.approx(12.8)
    assert collapse_verdict(_history([0.09] * 6, [88.0] * 6), 512, 4096, cfg).status == "healthy"


def test_step_metrics_measure_the_rank_on_the_first_rank_rows():
    torch.manual_seed(0)
    z = torch.randn(256, 512)
    window = StepMetrics(torch.device("cpu"), 1, rank_rows=64)
    window.add(1, torch.tensor(-0.5), z, 0.1)
    (row,) = window.flush()
    assert row["batch"] == 256 and row["loss"] == pytest.approx(-0.5)
    assert row["effective_rank"] == pytest.approx(effective_rank(z[:64]), rel=1e-6)
    assert row["effective_rank"] < 64 < effective_rank(z)  # the whole batch would score ~4x higher
    assert row["collapse_std"] == pytest.approx(collapse_std(z), rel=1e-6)  # the std still sees every row


def test_guard_counts_non_finite_values_and_can_be_disabled():
    g = CollapseGuard(CFG, D)
    assert [g.update(float("nan"), 40.0, 128) for _ in range(3)][-1]
    off = CollapseGuard(CollapseGuardConfig(enabled=False, window_steps=1), D)
    assert not off.update(0.0, 0.0, 128)


def test_guard_state_survives_resume_through_weights_only_checkpoint():
    g = CollapseGuard(CFG, D)
    g.update(0.12, 5.0, 128)
    g.update(0.12, 5.0, 128)
    buf = io.BytesIO()
    torch.save({"guard": g.state_dict()}, buf)
    buf.seek(0)
    resumed = CollapseGuard(CFG, D)
    resumed.load_state_dict(torch.load(buf, weights_only=True)["guard"])
    assert resumed.update(0.12, 5.0, 128)  # the third consecutive low step, counted across the resume
    fresh = CollapseGuard(CFG, D)
    fresh.load_state_dict({})  # a checkpoint without guard state starts fresh
    assert not fresh.update(0.12, 5.0, 128)
    with pytest.raises(ValueError, match="d=32"):
        CollapseGuard(CFG, 32).load_state_dict(g.state_dict())


# --------------------------------------------------------------------------- kNN


def test_knn_predict_matches_hand_computation():
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]), dim=1)
    labels = torch.tensor([0, 1, 1, 0])
    q = torch.tensor([[1.0, 0.0]])
    scores = knn_predict(q, bank, labels, num_classes=2, k=3, t=0.5)
    # top-3 by cosine: bank[0] (1.0, class 0), bank[1] (0.8, class 1), bank[2] (0.0, class 1)
    expected = torch.tensor([[math.exp(1.0 / 0.5), math.exp(0.8 / 0.5) + math.exp(0.0)]])
    torch.testing.assert_close(scores, expected)


def test_knn_k_is_clipped_to_bank_size():
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(5, 8), dim=1)
    labels = torch.tensor([0, 1, 2, 1, 0])
    q = F.normalize(torch.randn(3, 8), dim=1)
    torch.testing.assert_close(knn_predict(q, bank, labels, 3, k=200), knn_predict(q, bank, labels, 3, k=5))


def _knn_numpy(train, train_y, test, test_y, k, t, c):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    correct = 0
    for x, y in zip(test, test_y, strict=True):
        sim = train @ x
        idx = np.argsort(-sim)[:k]
        votes = np.zeros(c)
        for i in idx:
            votes[train_y[i]] += np.exp(sim[i] / t)
        correct += int(votes.argmax() == y)
    return correct / len(test)


def test_knn_accuracy_matches_brute_force_and_chunking_does_not_matter():
    torch.manual_seed(0)
    centers = torch.randn(4, 16) * 0.7
    ytr, yte = torch.randint(0, 4, (300,)), torch.randint(0, 4, (97,))
    tr, te = centers[ytr] + torch.randn(300, 16), centers[yte] + torch.randn(97, 16)
    ref = _knn_numpy(tr.double().numpy(), ytr.numpy(), te.double().numpy(), yte.numpy(), 20, 0.1, 4)
    assert knn_accuracy(tr, ytr, te, yte, k=20, t=0.1) == pytest.approx(ref)
    assert knn_accuracy(tr, ytr, te, yte, k=20, t=0.1, chunk_size=7) == pytest.approx(ref)
    assert 0.25 < ref < 1.0  # a non-trivial case


def test_knn_accuracy_separable_clusters_and_bad_labels():
    torch.manual_seed(0)
    centers = torch.eye(3) * 10
    ytr, yte = torch.arange(3).repeat(20), torch.arange(3).repeat(5)
    tr, te = centers[ytr] + torch.randn(60, 3) * 0.1, centers[yte] + torch.randn(15, 3) * 0.1
    assert knn_accuracy(tr, ytr, te, yte, k=200, t=0.1) == 1.0
    with pytest.raises(ValueError, match="labels must be >= 0"):
        knn_accuracy(tr, ytr, te, torch.full((15,), -1), k=5)


# --------------------------------------------------------------------------- top-k


def test_topk_accuracy_hand_example_and_clipping():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    labels = torch.tensor([1, 1, 0, 2])
    assert topk_correct(logits, labels, (1, 2, 5)) == {1: 1, 2: 2, 5: 4}
    acc = topk_accuracy(logits, labels)
    assert acc == {"top1": 25.0, "top5": 100.0}  # 3 classes: top-5 is clipped to top-3
    with pytest.raises(ValueError):
        topk_accuracy(logits, labels[:2])


# --------------------------------------------------------------------------- the end-of-run verdict


def _history(stds, ranks):
    return [{"epoch": i + 1, "collapse_std": s, "effective_rank": r} for i, (s, r) in enumerate(zip(stds, ranks,
                                                                                                    strict=True))]


def test_verdict_collapsed_healthy_and_margins():
    # D = 64, batch 128: thresholds std 0.0625, rank 12.8
    v = collapse_verdict(_history([0.12] * 6, [40, 38, 41, 39, 40, 5.0]), D, 128, CFG)
    assert v.status == "collapsed" and "effective rank: 5 < 12.8" in v.reason and "epoch 6" in v.reason
    v = collapse_verdict(_history([0.12] * 6, [40, 38, 41, 39, 40, 41]), D, 128, CFG)
    assert v.status == "healthy" and v.reason == ""
    assert v.rank.margin == pytest.approx(41 / 12.8) and v.std.margin == pytest.approx(0.12 / 0.0625)
    assert v.rank.falling is False and v.rank.slope == pytest.approx(0.1)  # least squares over epochs 3..6


def test_verdict_steady_fall_towards_the_threshold_is_collapsing_not_finished():
    """Above the threshold at the last epoch only because the budget ended: rank 40 -> 16 over the last
    3 epochs, 8 an epoch, under 12.8 in ~0.4 more epochs."""
    v = collapse_verdict(_history([0.12] * 6, [60, 50, 40, 32, 24, 16]), D, 128, CFG)
    assert v.status == "collapsing", v
    assert v.rank.falling and v.rank.slope == pytest.approx(-8.0) and v.rank.epochs_to_threshold == pytest.approx(0.4)
    assert "effective rank is still falling, 40 -> 16 over the last 3 epochs (-8/epoch)" in v.reason
    assert "threshold 12.8 (0.2 x min(rows 64, d 64)) in ~0.4 more epochs" in v.reason
    # The std, the same way: 0.12 -> 0.075 falling 0.015 an epoch, under 0.0625 in < 1 epoch.
    assert collapse_verdict(_history([0.2, 0.15, 0.12, 0.105, 0.09, 0.075], [40] * 6), D, 128, CFG).status == \
        "collapsing"
    # Noisy but steady over the last third of a longer run (measured: the digits without a predictor,
    # epochs 10-15, the rank measured on all 128 rows of its batch: threshold 25.6), 35.0 -> 30.1 at
    # -0.86/epoch with a rise on the way: still collapsing.
    ranks = [82.1, 71.6, 60.9, 55.2, 50.7, 44.5, 42.7, 37.7, 35.2, 35.0, 32.5, 30.7, 31.3, 30.5, 30.1]
    v = collapse_verdict(_history([0.043] * 15, ranks), 512, 128, CollapseGuardConfig(rank_rows=128))
    assert v.status == "collapsing" and v.rank.epochs == 5 and v.rank.slope == pytest.approx(-0.86, abs=0.01)


def test_verdict_slow_drift_noise_and_short_runs_stay_healthy():
    # Falling every epoch, but at 0.5 an epoch it needs 53 more epochs (> the 6 run so far): a drift.
    assert collapse_verdict(_history([0.12] * 6, [42, 41.5, 41, 40.5, 40, 39.5]), D, 128, CFG).status == "healthy"
    # Down on average but within the noise (slope -2.6 +- 3.7): no trend.
    v = collapse_verdict(_history([0.12] * 6, [40, 30, 42, 28, 41, 29]), D, 128, CFG)
    assert v.status == "healthy" and v.rank.slope == pytest.approx(-2.6) and not v.rank.falling
    # Fewer epochs than the trend window: no trend can be claimed.
    v = collapse_verdict(_history([0.12] * 3, [60, 40, 20]), D, 128, CFG)
    assert v.status == "healthy" and v.rank.slope is None
    assert collapse_verdict([], D, 128, CFG).status == "healthy"
