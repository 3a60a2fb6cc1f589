"""Evaluation pieces: feature extraction in eval mode, the linear classifier, and the frozen-backbone check."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from simsiam.config import LinearEvalConfig
from simsiam.evaluate import (
    BackboneChangedError,
    FrozenBackboneClassifier,
    assert_backbone_unchanged,
    build_linear_classifier,
    build_linear_optimizer,
    extract_features,
    knn_monitor,
    linear_eval_cached,
    linear_lr,
    snapshot_backbone,
    train_linear_cached,
)
from simsiam.model import SmallResNet
from simsiam.optim import LARS


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255 - 0.5) / 0.5


def blob_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 8x8 noise images of 3 classes told apart by which colour channel is bright."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randint(0, 60, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    for c in range(3):
        x[y == c, c] += 120
    return x, y


def batches(x, y, size=16):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def backbone(seed=0) -> SmallResNet:
    torch.manual_seed(seed)
    return SmallResNet(width=4, zero_init_residual=False)


def convnet(seed=0) -> nn.Module:
    """A one-conv backbone with BN whose pooled features keep the colour signal at a useful scale."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())


def test_extract_features_uses_eval_mode_without_grad_and_restores_mode():
    net = backbone().train()
    x, y = blob_images(40, 0)
    before = snapshot_backbone(net)
    feats, labels = extract_features(net, batches(x, y), normalize, "cpu")
    assert feats.shape == (40, 16) and feats.dtype == torch.float32 and not feats.requires_grad
    assert torch.equal(labels, y)
    assert net.training  # mode restored for the training loop
    assert_backbone_unchanged(before, net)  # BN running stats untouched: eval mode was used
    with torch.no_grad():
        torch.testing.assert_close(feats, net.eval()(normalize(x)))
    with pytest.raises(ValueError, match="no batches"):
        extract_features(net, [], normalize, "cpu")


def test_classifier_init_is_normal_001_with_zero_bias():
    fc = build_linear_classifier(2048, 1000, torch.Generator().manual_seed(0))
    assert fc.weight.shape == (1000, 2048)
    assert fc.weight.std().item() == pytest.approx(0.01, rel=0.01)
    assert abs(fc.weight.mean().item()) < 1e-4
    assert torch.equal(fc.bias, torch.zeros(1000))


def test_linear_optimizer_and_schedule():
    fc = build_linear_classifier(8, 3)
    lars = build_linear_optimizer(fc.parameters(), LinearEvalConfig(optimizer="lars", base_lr=0.1, batch_size=4096))
    assert isinstance(lars, LARS) and lars.param_groups[0]["lr"] == pytest.approx(1.6)
    assert lars.param_groups[0]["trust_coefficient"] == 0.001 and lars.param_groups[0]["weight_decay"] == 0.0
    sgd = build_linear_optimizer(fc.parameters(), LinearEvalConfig(optimizer="sgd", base_lr=0.5), batch_size=512)
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[0]["lr"] == pytest.approx(1.0)
    cfg = LinearEvalConfig(base_lr=0.1, batch_size=256, epochs=90)
    assert linear_lr(cfg, 0) == pytest.approx(0.1)
    assert linear_lr(cfg, 45) == pytest.approx(0.05)
    assert linear_lr(cfg, 90) == pytest.approx(0.0, abs=1e-12)


def clusters(n_per, dim, classes, seed, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 2
    y = torch.arange(classes).repeat_interleave(n_per)
    return centers[y] + spread * torch.randn(len(y), dim, generator=g), y


# LARS as the paper uses it (apex LARC) on raw features; SGD on standardised ones, as the sample preset.
@pytest.mark.parametrize("optimizer, base_lr, standardize", [("lars", 4.0, False), ("sgd", 0.5, True)])
def test_train_linear_cached_learns_separable_features(optimizer, base_lr, standardize):
    tr, ytr = clusters(60, 32, 6, seed=1)
    te, yte = clusters(20, 32, 6, seed=2)
    cfg = LinearEvalConfig(epochs=30, batch_size=64, optimizer=optimizer, base_lr=base_lr, standardize=standardize)
    out = train_linear_cached(tr, ytr, te, yte, num_classes=6, cfg=cfg, seed=0)
    assert out["top1"] > 95.0 and out["top5"] == 100.0 and out["train_top1"] > 95.0
    assert out["lr"] == pytest.approx(base_lr * 64 / 256)
    assert out["steps"] == 30 * 6  # ceil(360 / 64) steps per epoch
    assert out["classifier"]["weight"].shape == (6, 32)


def test_train_linear_cached_is_seeded_and_clips_the_batch():
    tr, ytr = clusters(10, 8, 3, seed=1, spread=2.0)
    te, yte = clusters(5, 8, 3, seed=2, spread=2.0)
    cfg = LinearEvalConfig(epochs=3, batch_size=4096, optimizer="sgd", base_lr=0.1)
    a = train_linear_cached(tr, ytr, te, yte, 3, cfg, seed=7)
    b = train_linear_cached(tr, ytr, te, yte, 3, cfg, seed=7)
    c = train_linear_cached(tr, ytr, te, yte, 3, cfg, seed=8)
    assert torch.equal(a["classifier"]["weight"], b["classifier"]["weight"])
    assert not torch.equal(a["classifier"]["weight"], c["classifier"]["weight"])
    assert a["lr"] == pytest.approx(0.1 * 30 / 256) and a["steps"] == 3  # one full-set batch per epoch


def test_train_linear_cached_rejects_bad_labels():
    tr, ytr = clusters(4, 8, 3, seed=1)
    with pytest.raises(ValueError, match=r"train labels must lie in \[0, 3\)"):
        train_linear_cached(tr, ytr - 1, tr, ytr, 3, LinearEvalConfig(epochs=1), seed=0)


def test_backbone_change_is_caught_for_weights_and_bn_stats():
    net = backbone()
    before = snapshot_backbone(net)
    assert_backbone_unchanged(before, net)
    with torch.no_grad():
        net.stem[0].weight[0, 0, 0, 0] += 1e-6
    with pytest.raises(BackboneChangedError, match=r"stem\.0\.weight"):
        assert_backbone_unchanged(before, net)

    net = backbone()
    before = snapshot_backbone(net)
    net.train()(torch.randn(4, 3, 8, 8))  # a forward in train mode moves BN running statistics
    with pytest.raises(BackboneChangedError, match="running_mean"):
        assert_backbone_unchanged(before, net)


def test_frozen_backbone_classifier_survives_train_mode_and_a_full_optimizer():
    """The classic bugs: model.train() switching the backbone's BN to batch stats, or the backbone's
    parameters ending up in the optimiser. Neither may change the backbone."""
    torch.manual_seed(0)
    model = FrozenBackboneClassifier(backbone(), dim=16, num_classes=3)
    before = snapshot_backbone(model.backbone)
    fc_before = model.fc.weight.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
    x, y = blob_images(32, 1)
    for _ in range(3):
        model.train()
        assert not model.backbone.training and model.fc.training
        loss = nn.functional.cross_entropy(model(normalize(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert_backbone_unchanged(before, model.backbone)
    assert not torch.equal(model.fc.weight, fc_before)


def test_linear_eval_cached_end_to_end_on_a_frozen_backbone():
    net = convnet().train()
    xtr, ytr = blob_images(150, 0)
    xte, yte = blob_images(60, 1)
    cfg = LinearEvalConfig(epochs=40, batch_size=32, optimizer="sgd", base_lr=2.0)
    out = linear_eval_cached(net, batches(xtr, ytr), batches(xte, yte), 3, normalize, cfg, seed=0)
    assert out["top1"] > 90.0  # random conv features tell the colours apart
    assert out["top5"] == 100.0
    assert net.training  # its mode is the caller's; only its tensors are checked


def test_knn_monitor_on_a_random_backbone():
    net = convnet()
    xtr, ytr = blob_images(150, 0)
    xte, yte = blob_images(60, 1)
    acc = knn_monitor(net, batches(xtr, ytr), batches(xte, yte), normalize, "cpu", k=20, t=0.1)
    assert 0.9 < acc <= 1.0


def _digits_random_init_features():
    """Features of the sample preset's backbone at random init on scikit-learn's digits (16 px, the
    eval view): per-dimension std ~0.004, the scale the unstandardised protocol could not fit."""
    import numpy as np

    from simsiam import config as C
    from simsiam.augment import normalize as normalize_for
    from simsiam.augment.geometric import eval_transform
    from simsiam.data.convert import digits_split
    from simsiam.model import SimSiam

    cfg = C.load("sample", {"data.path": "builtin:digits", "data.image_size": 16})
    torch.manual_seed(0)
    net = SimSiam(cfg.model).backbone
    out = []
    for images, labels, _ in digits_split().values():
        x = torch.from_numpy(np.stack([eval_transform(np.repeat(i[..., None], 3, 2), 16, 1.0) for i in images]))
        f, y = extract_features(net, batches(x, torch.from_numpy(labels), 256), lambda b: normalize_for(b, cfg.data),
                                "cpu")
        out += [f, y]
    return cfg, out


def test_cached_protocol_fits_random_init_features_like_standardised_logistic_regression():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    cfg, (tr, ytr, te, yte) = _digits_random_init_features()
    assert tr.std(dim=0).mean() < 0.05  # tiny features: what made the old protocol unfair
    scaler = StandardScaler().fit(tr.numpy())
    reference = 100 * LogisticRegression(max_iter=2000).fit(scaler.transform(tr.numpy()), ytr.numpy()).score(
        scaler.transform(te.numpy()), yte.numpy())
    lin = cfg.eval.linear
    ours = train_linear_cached(tr, ytr, te, yte, 10, lin, seed=0)
    assert abs(ours["top1"] - reference) <= 2.0, (ours["top1"], reference)
    # Fair to any scale: the same features x1000 score the same.
    scaled = train_linear_cached(tr * 1000, ytr, te * 1000, yte, 10, lin, seed=0)
    assert abs(scaled["top1"] - ours["top1"]) <= 1.0
    # The folded classifier applies to the raw features and reproduces the score.
    fc = nn.Linear(tr.shape[1], 10)
    fc.load_state_dict(ours["classifier"])
    with torch.no_grad():
        assert (fc(te).argmax(1) == yte).float().mean().item() * 100 == pytest.approx(ours["top1"], abs=0.5)
    # Without standardisation the same SGD cannot fit these features (the bug this protocol fixes).
    raw = train_linear_cached(tr, ytr, te, yte, 10, LinearEvalConfig(**{**lin.__dict__, "standardize": False}), 0)
    assert raw["top1"] < reference - 10


def test_baselines_score_random_init_and_raw_pixels_under_the_same_protocol():
    from simsiam.evaluate import baseline_scores, ssl_gain

    xtr, ytr = blob_images(120, 0)
    xte, yte = blob_images(60, 1)
    net = convnet()
    cfg = LinearEvalConfig(epochs=20, batch_size=32, optimizer="sgd", base_lr=0.1)
    out = baseline_scores(net, batches(xtr, ytr), batches(xte, yte), 3, normalize, cfg, seed=0, knn_k=10, knn_t=0.1)
    assert set(out) == {"random_init", "raw_pixels"}
    for scores in out.values():
        assert set(scores) == {"linear_top1", "knn_top1"}
    # Colour decides the class: both baselines read it off (chance is 33%).
    assert out["raw_pixels"]["linear_top1"] > 90 and out["random_init"]["linear_top1"] > 90
    assert ssl_gain(95.0, {"a": {"linear_top1": 90.0}, "b": {"linear_top1": 80.0}}) == pytest.approx(5.0)
