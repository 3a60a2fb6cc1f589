"""Evaluation of a pretrained backbone: feature extraction, kNN monitor, linear evaluation.

Linear evaluation follows the paper: the backbone is frozen and stays in eval mode throughout (its BN
running statistics never change), a linear classifier (weights N(0, 0.01), bias 0) is trained with
LARS (or SGD), lr = base_lr x batch / 256 with cosine decay, and top-1/top-5 are reported. A snapshot
of every backbone tensor, parameters and BN buffers alike, is compared after training: a backbone
that moved is a bug, and it is reported as one rather than as a good accuracy.

Two protocols share these pieces. ``cached``: features computed once by the frozen backbone, then
the classifier trains on them (fast; what searches use). ``full``: the paper's, with augmentation on
every epoch; its distributed loop uses :class:`FrozenBackboneClassifier`,
:func:`build_linear_classifier`, :func:`build_linear_optimizer` and :func:`linear_lr`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from simsiam.config import Config, LinearEvalConfig
from simsiam.metrics import knn_accuracy, topk_accuracy
from simsiam.optim import LARS, cosine_lr, scaled_lr, set_lr


class BackboneChangedError(RuntimeError):
    """A backbone that must be frozen was modified (a weight or a BN running statistic)."""


def snapshot_backbone(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of every parameter and buffer (BN running stats included), for
    :func:`assert_backbone_unchanged`."""
    return {k: v.detach().to("cpu", copy=True) for k, v in backbone.state_dict().items()}


def assert_backbone_unchanged(before: dict[str, torch.Tensor], backbone: nn.Module) -> None:
    """Raise :class:`BackboneChangedError` naming the tensors that differ from the snapshot ``before``."""
    now = backbone.state_dict()
    if now.keys() != before.keys():
        diff = sorted(now.keys() ^ before.keys())
        raise BackboneChangedError(f"frozen backbone's tensors changed: keys added or removed: {diff[:5]}")
    changed = []
    for k, v in before.items():
        cur = now[k].detach().cpu()
        if cur.shape != v.shape or not torch.equal(cur, v):
            delta = (cur.double() - v.double()).abs().max().item() if cur.shape == v.shape else float("nan")
            changed.append(f"{k} (max |change| {delta:.3g})")
    if changed:
        raise BackboneChangedError(f"frozen backbone changed during linear evaluation: {len(changed)} tensor(s) "
                                   f"differ, e.g. {', '.join(changed[:5])}. Parameters must not be in the "
                                   "optimiser and the backbone must stay in eval mode (BN running stats).")


@torch.no_grad()
def extract_features(backbone: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     normalize: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str,
                     autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every image under the backbone in eval mode, as (float32 (N, D), int64 (N,)) on CPU.

    ``batches`` yields (uint8 images (n, 3, S, S), labels); ``normalize`` maps the uint8 batch on
    ``device`` to the network's float input. The backbone's train/eval mode is restored afterwards, so
    the kNN monitor can run mid-training. ``autocast`` runs the backbone under bf16 autocast."""
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    try:
        for images, y in batches:
            x = normalize(images.to(device, non_blocking=True))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                f = backbone(x)
            feats.append(f.float().cpu())
            labels.append(torch.as_tensor(y).long().cpu())
    finally:
        backbone.train(was_training)
    if not feats:
        raise ValueError("extract_features: no batches")
    return torch.cat(feats), torch.cat(labels)


def knn_monitor(backbone: nn.Module, bank_batches: Iterable, test_batches: Iterable,
                normalize: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str,
                k: int = 200, t: float = 0.1) -> float:
    """Weighted-kNN top-1 in [0, 1]: bank = features of ``bank_batches``, queries = ``test_batches``."""
    bank_f, bank_l = extract_features(backbone, bank_batches, normalize, device)
    test_f, test_l = extract_features(backbone, test_batches, normalize, device)
    return knn_accuracy(bank_f.to(device), bank_l, test_f.to(device), test_l, k=k, t=t)


# --------------------------------------------------------------------------- linear classifier


def build_linear_classifier(dim: int, num_classes: int, generator: torch.Generator | None = None) -> nn.Linear:
    """Linear(dim, num_classes) with the paper's init: weights N(0, 0.01), bias 0."""
    fc = nn.Linear(dim, num_classes)
    with torch.no_grad():
        fc.weight.normal_(0.0, 0.01, generator=generator)
        fc.bias.zero_()
    return fc


def build_linear_optimizer(params: Iterable[nn.Parameter], cfg: LinearEvalConfig,
                           batch_size: int | None = None) -> torch.optim.Optimizer:
    """LARS (the paper's; trust coefficient 0.001) or SGD, at lr = base_lr x batch / 256.
    ``batch_size`` is the GLOBAL batch actually used (default ``cfg.batch_size``)."""
    lr = scaled_lr(cfg.base_lr, batch_size or cfg.batch_size)
    if cfg.optimizer == "lars":
        return LARS(params, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def linear_lr(cfg: LinearEvalConfig, epoch: float, batch_size: int | None = None) -> float:
    """The classifier's lr at fractional ``epoch``: cosine decay from base_lr x batch / 256, no warm-up."""
    return cosine_lr(scaled_lr(cfg.base_lr, batch_size or cfg.batch_size), epoch, cfg.epochs)


class FrozenBackboneClassifier(nn.Module):
    """Backbone + linear head where the backbone can never train: no gradients, and ``train()`` leaves
    it in eval mode, so the usual ``model.train()`` at the top of an epoch cannot switch its BN to batch
    statistics (the classic way a "frozen" backbone still changes)."""

    def __init__(self, backbone: nn.Module, dim: int, num_classes: int, generator: torch.Generator | None = None):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.fc = build_linear_classifier(dim, num_classes, generator)

    def train(self, mode: bool = True) -> FrozenBackboneClassifier:
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            f = self.backbone(x)
        return self.fc(f.float())


def train_linear_cached(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                        test_labels: torch.Tensor, num_classes: int, cfg: LinearEvalConfig, seed: int) -> dict:
    """Train the linear classifier on fixed features; return test ``top1``/``top5`` (percent),
    ``train_top1``, ``lr`` (initial), ``steps`` and the classifier's ``state_dict`` (CPU).

    With ``cfg.standardize`` the classifier trains on features standardised with the fit set's mean and
    std (:func:`feature_standardizer`), so SGD at one lr fits features of any scale (a random-init
    backbone's are ~1e-3); the returned ``classifier`` has the standardisation folded in and applies to
    the raw features.

    Minibatches are reshuffled every epoch from ``seed``; the lr follows the batch actually used
    (``min(cfg.batch_size, N)``), decayed by a per-step cosine over ``cfg.epochs``."""
    n, dim = train_feats.shape
    for name, labels in (("train", train_labels), ("test", test_labels)):
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"train_linear_cached: {name} labels must lie in [0, {num_classes}), got "
                             f"[{int(labels.min())}, {int(labels.max())}] (unlabelled rows cannot be used)")
    if n == 0 or test_feats.shape[0] == 0:
        raise ValueError(f"train_linear_cached: need train and test features, got {n} and {test_feats.shape[0]}")
    device = train_feats.device
    gen = torch.Generator().manual_seed(seed)
    fc = build_linear_classifier(dim, num_classes, gen).to(device)
    batch = min(cfg.batch_size, n)
    optimizer = build_linear_optimizer(fc.parameters(), cfg, batch)
    init_lr = optimizer.param_groups[0]["lr"]
    steps_per_epoch = math.ceil(n / batch)
    x, y = train_feats.float(), train_labels.long().to(device)
    test_x = test_feats.float().to(device)
    if cfg.standardize:
        mean, std = feature_standardizer(x)
        x, test_x = (x - mean) / std, (test_x - mean) / std
    steps = 0
    fc.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=gen).to(device)
        for i in range(steps_per_epoch):
            set_lr(optimizer, cosine_lr(init_lr, epoch + i / steps_per_epoch, cfg.epochs), init_lr)
            idx = order[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(fc(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
    fc.eval()
    with torch.no_grad():
        test = topk_accuracy(fc(test_x), test_labels.to(device), (1, 5))
        train_top1 = topk_accuracy(fc(x), y, (1,))["top1"]
        weight, bias = fc.weight.detach(), fc.bias.detach()
        if cfg.standardize:  # fold the standardisation in: the classifier applies to the raw features
            weight = weight / std
            bias = bias - weight @ mean
    return {"top1": test["top1"], "top5": test["top5"], "train_top1": train_top1, "lr": init_lr, "steps": steps,
            "classifier": {"weight": weight.cpu().clone(), "bias": bias.cpu().clone()}}


def feature_standardizer(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension (mean, std) of fit-set features, for ``(x - mean) / std``.

    Constant dimensions (dead ReLUs; std below 1e-6 of the largest) get std 1, so they stay 0 instead of
    amplifying rounding noise. Statistics in float64: features can be ~1e-3 in scale with a large mean."""
    f = feats.double()
    mean, std = f.mean(dim=0), f.std(dim=0)
    std = torch.where(std > 1e-6 * std.max().clamp_min(1e-300), std, torch.ones_like(std))
    return mean.float(), std.float()


def linear_eval_cached(backbone: nn.Module, train_batches: Iterable, test_batches: Iterable, num_classes: int,
                       normalize: Callable[[torch.Tensor], torch.Tensor], cfg: LinearEvalConfig, seed: int,
                       device: torch.device | str = "cpu") -> dict:
    """The cached protocol end to end on one process: snapshot, features from the eval-mode backbone,
    classifier, then the check that the backbone did not change. Returns :func:`train_linear_cached`'s dict."""
    before = snapshot_backbone(backbone)
    train_f, train_l = extract_features(backbone, train_batches, normalize, device)
    test_f, test_l = extract_features(backbone, test_batches, normalize, device)
    result = train_linear_cached(train_f.to(device), train_l, test_f.to(device), test_l, num_classes, cfg, seed)
    assert_backbone_unchanged(before, backbone)
    return result


def raw_pixel_features(batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       normalize: Callable[[torch.Tensor], torch.Tensor],
                       device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw-pixel baseline's features: each normalised eval image flattened, as (float32 (N, 3 S S), labels)."""
    feats, labels = [], []
    for images, y in batches:
        feats.append(normalize(images.to(device)).flatten(1).float().cpu())
        labels.append(torch.as_tensor(y).long().cpu())
    if not feats:
        raise ValueError("raw_pixel_features: no batches")
    return torch.cat(feats), torch.cat(labels)


def baseline_scores(random_backbone: nn.Module, train_batches: list, test_batches: list, num_classes: int,
                    normalize: Callable[[torch.Tensor], torch.Tensor], cfg: LinearEvalConfig, seed: int,
                    knn_k: int, knn_t: float, device: torch.device | str = "cpu") -> dict:
    """What a trained backbone must beat, under the same cached protocol, data and kNN monitor:
    ``{"random_init": {...}, "raw_pixels": {...}}``, each ``{"linear_top1", "knn_top1"}`` (percent).

    ``random_backbone`` is the same architecture untrained; the raw-pixel features are the eval images
    (normalised) flattened. The batch lists are iterated once per feature set."""
    before = snapshot_backbone(random_backbone)
    extractors = {"random_init": lambda b: extract_features(random_backbone, b, normalize, device),
                  "raw_pixels": lambda b: raw_pixel_features(b, normalize, device)}
    out = {}
    for name, extract in extractors.items():
        (ftr, ltr), (fte, lte) = extract(train_batches), extract(test_batches)
        ftr, fte = ftr.to(device), fte.to(device)
        lin = train_linear_cached(ftr, ltr, fte, lte, num_classes, cfg, seed)
        knn = knn_accuracy(ftr, ltr, fte, lte, k=knn_k, t=knn_t, num_classes=num_classes)
        out[name] = {"linear_top1": lin["top1"], "knn_top1": 100.0 * knn}
    assert_backbone_unchanged(before, random_backbone)
    return out


def ssl_gain(linear_top1: float, baselines: dict) -> float:
    """Trained linear top-1 minus the better baseline's (percentage points)."""
    return linear_top1 - max(b["linear_top1"] for b in baselines.values())


# ----------------------------------------------------------------------------- linear evaluation on Ray Train


def linear_eval_cached_on_shards(backbone: nn.Module, cfg: Config, num_classes: int, device: torch.device,
                                 fit: str, test: str) -> dict:
    """The cached protocol inside a Ray Train worker, on its dataset shards named ``fit`` and ``test``
    (eval-view datasets). Used by the standalone evaluation and at the end of a pretraining run."""
    import ray.train

    from simsiam.augment import normalize
    from simsiam.data import pipeline as data_pipeline
    from simsiam.model import SimSiam

    norm = lambda x: normalize(x, cfg.data)  # noqa: E731
    fit_stats: dict = {}
    test_stats: dict = {}  # rows skipped as bad (data.on_bad_image=skip), counted for the console
    fit_batches = data_pipeline.iter_eval_batches(ray.train.get_dataset_shard(fit), 256, device, stats=fit_stats)
    test_batches = data_pipeline.iter_eval_batches(ray.train.get_dataset_shard(test), 256, device, stats=test_stats)
    if cfg.eval.baselines:  # read once, scored three ways (uint8: 3 KB per 32 px image)
        fit_batches, test_batches = list(fit_batches), list(test_batches)
    out = linear_eval_cached(backbone, fit_batches, test_batches, num_classes, norm, cfg.eval.linear,
                             cfg.train.seed, device)
    result = {"top1": out["top1"], "top5": out["top5"], "train_top1": out["train_top1"], "protocol": "cached",
              "backbone_unchanged": True, "skipped": fit_stats.get("skipped", 0) + test_stats.get("skipped", 0)}
    if cfg.eval.baselines:
        # The pretraining run's own starting point: the same seed gives the same initial weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            random_backbone = SimSiam(cfg.model).backbone.to(device).eval().requires_grad_(False)
        result["baselines"] = baseline_scores(random_backbone, fit_batches, test_batches, num_classes, norm,
                                              cfg.eval.linear, cfg.train.seed, cfg.train.knn_k, cfg.train.knn_t,
                                              device)
    return result


def _load_backbone(cfg: Config, checkpoint_path: str, device: torch.device) -> nn.Module:
    """The pretrained backbone, frozen and in eval mode (BN statistics never move)."""
    import ray.train

    from simsiam import checkpoint as ckpt_io
    from simsiam.model import SimSiam

    net = SimSiam(cfg.model)
    with ray.train.Checkpoint(checkpoint_path).as_directory() as d:
        net.load_state_dict(ckpt_io.load(d)["model"])
    return net.backbone.to(device).eval().requires_grad_(False)


def _backbone_dim(backbone: nn.Module, cfg: Config, device: torch.device) -> int:
    with torch.no_grad():
        return backbone(torch.zeros(2, 3, cfg.data.image_size, cfg.data.image_size, device=device)).shape[1]


def linear_eval_loop_per_worker(loop_config: dict) -> dict:
    """One linear-evaluation worker. ``cached``: rank 0 extracts features once and fits the classifier.
    ``full`` (the paper's): augmented batches through the frozen backbone every epoch, DDP over the
    classifier only; rank 0 then scores the held-out set."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from simsiam.augment import normalize
    from simsiam.config import from_dict
    from simsiam.data import pipeline as data_pipeline
    from simsiam.ray_utils import worker_print

    cfg = from_dict(loop_config["config"])
    lin = cfg.eval.linear
    num_classes = loop_config["num_classes"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)
    backbone = _load_backbone(cfg, loop_config["checkpoint"], device)
    norm = lambda x: normalize(x, cfg.data)  # noqa: E731
    result: dict = {}

    if lin.protocol == "cached":
        if rank == 0:
            result = linear_eval_cached_on_shards(backbone, cfg, num_classes, device, "train_eval", "test")
    else:
        before = snapshot_backbone(backbone)
        model = FrozenBackboneClassifier(backbone, _backbone_dim(backbone, cfg, device), num_classes).to(device)
        ddp = ray.train.torch.prepare_model(model)  # only fc has gradients, so DDP syncs the classifier alone
        per_worker = max(1, lin.batch_size // world)
        optimizer = build_linear_optimizer(model.fc.parameters(), lin, per_worker * world)
        init_lr = optimizer.param_groups[0]["lr"]
        steps_per_epoch = max(1, loop_config["num_rows"] // (per_worker * world))
        train_it = ray.train.get_dataset_shard("train")
        for epoch in range(lin.epochs):
            ddp.train()
            for i, (images, labels) in enumerate(data_pipeline.iter_eval_batches(train_it, per_worker, device)):
                set_lr(optimizer, cosine_lr(init_lr, epoch + min(i / steps_per_epoch, 1.0), lin.epochs), init_lr)
                loss = F.cross_entropy(ddp(norm(images)), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if rank == 0 and ((epoch + 1) % max(1, lin.epochs // 10) == 0 or epoch + 1 == lin.epochs):
                worker_print(f"[simsiam] linear epoch {epoch + 1}/{lin.epochs} loss {loss.item():.4f}")
        if rank == 0:
            model.eval()
            logits, labels = [], []
            with torch.no_grad():
                for images, y in data_pipeline.iter_eval_batches(ray.train.get_dataset_shard("test"), 256, device):
                    logits.append(model(norm(images)))
                    labels.append(y)
            result = topk_accuracy(torch.cat(logits), torch.cat(labels), (1, 5))
        if world > 1:
            dist.barrier()
        assert_backbone_unchanged(before, backbone)

    result.update(protocol=lin.protocol, backbone_unchanged=True)
    ray.train.report({k: v for k, v in result.items() if isinstance(v, (int, float))})
    return result


def linear_eval(cfg: Config, checkpoint_path: str, train_path: str, eval_path: str, storage_path: str) -> dict:
    """Linear evaluation of a pretraining checkpoint as its own Ray Train run.

    Returns ``top1``/``top5`` (percent), ``protocol`` and ``backbone_unchanged``. The cached protocol
    runs on one worker (features are cheap to compute once); the full one on ``eval.linear.num_workers``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from simsiam.data import pipeline as data_pipeline

    lin = cfg.eval.linear
    info = data_pipeline.dataset_info(train_path)
    if not info["labeled"]:
        raise ValueError(f"{train_path}: linear evaluation needs labels, but some rows have none (label -1); "
                         "set eval.enabled=false to pretrain only")
    datasets = {"test": data_pipeline.eval_dataset(cfg.data, eval_path)}
    if lin.protocol == "cached":
        datasets["train_eval"] = data_pipeline.eval_dataset(cfg.data, train_path)
    else:
        datasets["train"] = data_pipeline.labeled_train_dataset(cfg.data, train_path, cfg.train.seed)
    t = cfg.train
    trainer = TorchTrainer(
        linear_eval_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "checkpoint": checkpoint_path,
                           "num_classes": info["num_classes"], "num_rows": info["num_rows"]},
        scaling_config=ray.train.ScalingConfig(
            num_workers=1 if lin.protocol == "cached" else lin.num_workers, use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}),
        run_config=ray.train.RunConfig(name=f"{cfg.run.name}-linear-{lin.protocol}", storage_path=storage_path),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"] if "train" in datasets else [],
                                            execution_options=data_pipeline.ingest_options(cfg.data)),
    )
    return dict(trainer.fit().return_value or {})
