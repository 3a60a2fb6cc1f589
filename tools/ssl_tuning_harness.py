"""Ray-free SimSiam tuning harness: the built-in ``shapes`` set -> pretraining -> cached linear + baselines.

Runs the project's own pieces (``SimSiamStep``, the geometric and photometric augmentations, the
optimiser and lr schedule, ``train_linear_cached`` and the kNN monitor) in one process, without Ray, so
a design of the generator or a recipe can be scored in minutes, beside the baselines under the same
protocol as ``results.json``: raw pixels, the same network at random init and (``--supervised N``) the
same network trained with labels for N steps on the same augmentations (the task's upper bound).

    nice -n 19 python tools/ssl_tuning_harness.py --set train.epochs=10 --gen RADIUS='(0.3,0.45)'

``--set`` overrides the sample preset (as ``simsiam run sample --set``), ``--gen NAME=VALUE`` sets a
knob of :mod:`simsiam.data.shapes` (a Python literal). One JSON line per report; the last starts with
RESULT. Steps, not wall time, are what carry over to ``simsiam run``.
"""
from __future__ import annotations

import argparse
import ast
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from simsiam import config as C
from simsiam.augment import PhotometricAugment, normalize
from simsiam.augment.geometric import GeometricAugment, eval_transform
from simsiam.data import shapes
from simsiam.evaluate import extract_features, raw_pixel_features, train_linear_cached
from simsiam.metrics import knn_accuracy
from simsiam.model import SimSiam
from simsiam.optim import build_optimizer, cosine_lr, scaled_lr, set_lr
from simsiam.step import SimSiamStep


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", action="append", default=[], help="override of the sample preset, dotted.name=value")
    p.add_argument("--gen", action="append", default=[], help="knob of simsiam.data.shapes, NAME=python literal")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--ntrain", type=int, default=5000, help="training images generated")
    p.add_argument("--ntest", type=int, default=1000, help="test images generated")
    p.add_argument("--steps", type=int, default=0, help="stop pretraining after this many steps (0 = all epochs)")
    p.add_argument("--supervised", type=int, default=0, help="also train the network with labels for N steps")
    p.add_argument("--no-ssl", action="store_true", help="baselines only")
    p.add_argument("--evals", type=int, default=3, help="linear evaluations during pretraining")
    p.add_argument("--tag", default="", help="label echoed in the output")
    return p.parse_args(argv)


class Harness:
    """The generated split, its eval views, and the cached protocol over them."""

    def __init__(self, cfg: C.Config, ntrain: int, ntest: int):
        self.cfg = cfg
        t0 = time.perf_counter()
        d = shapes.shapes_split(0, {"train": ntrain, "test": ntest})
        self.gen_s = time.perf_counter() - t0
        (self.xtr, ytr), (xte, yte) = d["train"], d["test"]
        self.num_classes = len(shapes.CLASSES)
        s, r = cfg.data.image_size, cfg.data.eval_resize
        self.etr = torch.from_numpy(np.stack([eval_transform(x, s, r) for x in self.xtr]))
        self.ete = torch.from_numpy(np.stack([eval_transform(x, s, r) for x in xte]))
        self.ytr, self.yte = torch.from_numpy(ytr), torch.from_numpy(yte)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.cfg.data)

    @staticmethod
    def _batches(x: torch.Tensor, y: torch.Tensor) -> list:
        return [(x[i:i + 256], y[i:i + 256]) for i in range(0, len(x), 256)]

    def score(self, extract) -> dict:
        """Cached linear and kNN top-1 (percent) of the features ``extract(batches)`` gives."""
        ftr, _ = extract(self._batches(self.etr, self.ytr))
        fte, _ = extract(self._batches(self.ete, self.yte))
        lin = train_linear_cached(ftr, self.ytr, fte, self.yte, self.num_classes, self.cfg.eval.linear,
                                  self.cfg.train.seed)
        knn = knn_accuracy(ftr, self.ytr, fte, self.yte, k=self.cfg.train.knn_k, t=self.cfg.train.knn_t,
                           num_classes=self.num_classes)
        return {"linear": round(lin["top1"], 1), "knn": round(100 * knn, 1)}

    def score_backbone(self, backbone: torch.nn.Module) -> dict:
        return self.score(lambda b: extract_features(backbone, b, self.norm, "cpu"))

    def views(self, geo: GeometricAugment, idx: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        return torch.from_numpy(np.stack([geo(self.xtr[j], rng) for j in idx]))


def supervised(h: Harness, steps: int) -> dict:
    """The task's upper bound: the same backbone + a linear head trained with labels on the same
    augmentations (crop, flip, colour), SGD at the preset's lr, cosine over ``steps``."""
    cfg = h.cfg
    torch.manual_seed(cfg.train.seed)
    net = SimSiam(cfg.model).backbone
    head = torch.nn.Linear(net.out_dim, h.num_classes)
    params = list(net.parameters()) + list(head.parameters())
    lr0 = scaled_lr(cfg.optim.base_lr, cfg.optim.batch_size)
    opt = torch.optim.SGD(params, lr=lr0, momentum=0.9, weight_decay=cfg.optim.weight_decay)
    geo, photo = GeometricAugment(cfg.data.image_size, cfg.data.crop_min_scale), PhotometricAugment(cfg.data)
    rng, gen = np.random.default_rng(1), torch.Generator().manual_seed(1)
    n, b = len(h.xtr), cfg.optim.batch_size
    for step in range(steps):
        idx = rng.integers(0, n, b)
        x = photo(h.views(geo, idx, rng), generator=gen)
        set_lr(opt, cosine_lr(lr0, step, steps), lr0)
        loss = F.cross_entropy(head(net(x)), h.ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        pred = torch.cat([head(net(h.norm(x))).argmax(1) for x, _ in h._batches(h.ete, h.yte)])
    return {"steps": steps, "test_top1": round(100 * float((pred == h.yte).float().mean()), 1),
            "linear_on_features": h.score_backbone(net)["linear"]}


def pretrain(h: Harness, max_steps: int, evals: int) -> dict:
    """SimSiam pretraining as ``simsiam run`` does it (same step, schedule and augmentations), with
    the cached linear protocol ``evals`` times along the way."""
    cfg = h.cfg
    torch.manual_seed(cfg.train.seed)
    net = SimSiam(cfg.model)
    b = cfg.optim.batch_size
    opt = build_optimizer(net, cfg.optim, b)
    init_lr = scaled_lr(cfg.optim.base_lr, b)
    step_fn = SimSiamStep(net, cfg, torch.device("cpu"))
    geo = GeometricAugment(cfg.data.image_size, cfg.data.crop_min_scale)
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    per_epoch = len(h.xtr) // b
    total = cfg.train.epochs * per_epoch if not max_steps else min(max_steps, cfg.train.epochs * per_epoch)
    eval_at = {round(total * (k + 1) / evals) for k in range(evals)}
    hist, step, t_step = [], 0, 0.0
    while step < total:
        order = rng.permutation(len(h.xtr))
        for i in range(per_epoch):
            if step >= total:
                break
            idx = order[i * b:(i + 1) * b]
            v1, v2 = h.views(geo, idx, rng), h.views(geo, idx, rng)
            t0 = time.perf_counter()
            net.train()
            set_lr(opt, cosine_lr(init_lr, step / per_epoch, cfg.train.epochs, cfg.optim.warmup_epochs), init_lr)
            loss, _ = step_fn(v1, v2, gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            t_step += time.perf_counter() - t0
            step += 1
            if step in eval_at:
                hist.append({"step": step, "loss": round(loss.item(), 3), **h.score_backbone(net.backbone),
                             "step_ms": round(1000 * t_step / step)})
                print(json.dumps(hist[-1]), flush=True)
    return {"trained": hist[-1], "hist": hist}


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    for knob in a.gen:
        name, value = knob.split("=", 1)
        if not hasattr(shapes, name):
            raise SystemExit(f"--gen {knob}: simsiam.data.shapes has no knob {name!r}")
        setattr(shapes, name, ast.literal_eval(value))
    cfg = C.load("sample", ["data.path=builtin:shapes", *a.set])
    h = Harness(cfg, a.ntrain, a.ntest)
    res: dict = {"tag": a.tag, "set": a.set, "gen": a.gen, "gen_s": round(h.gen_s, 1)}
    torch.manual_seed(cfg.train.seed)
    res["random_init"] = h.score_backbone(SimSiam(cfg.model).backbone)
    res["raw"] = h.score(lambda b: raw_pixel_features(b, h.norm, "cpu"))
    print(json.dumps(res), flush=True)
    if a.supervised:
        res["supervised"] = supervised(h, a.supervised)
        print(json.dumps({"supervised": res["supervised"]}), flush=True)
    if not a.no_ssl:
        res.update(pretrain(h, a.steps, a.evals))
        t = res["trained"]["linear"]
        res["gain_vs_raw"] = round(t - res["raw"]["linear"], 1)
        res["gain_vs_random"] = round(t - res["random_init"]["linear"], 1)
    print("RESULT", json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
