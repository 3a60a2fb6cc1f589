"""GPU training-step benchmark (needs CUDA; Ray is not needed): what AMP, channels_last, the batched
GPU augmentation and the per-step collapse metrics cost or save, on the paper's two recipes.

    python -m benchmarks.gpu_step --out FILE.json [--quick]

Measured with the project's own step (:class:`simsiam.step.SimSiamStep`: photometric augmentation on
the device, forward, loss) plus backward and SGD, on random uint8 views already on the GPU, so the
numbers isolate the device-side work. Also checks that a bf16-autocast loss matches the fp32 loss for
the same weights and views, and that SyncBN + DDP over NCCL runs (a world of one process).
JSON keys: name, metric, ours (bf16 + channels_last pairs/s), baseline (fp32 NCHW), ratio, target,
config, plus per-variant and per-recipe details.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from simsiam import config as C
from simsiam.io import atomic_write_json
from simsiam.metrics import effective_rank
from simsiam.model import SimSiam
from simsiam.optim import build_optimizer
from simsiam.step import SimSiamStep, StepMetrics

TARGET = 1.5  # bf16 + channels_last should beat fp32 by at least this on Hopper


def _sync() -> None:
    torch.cuda.synchronize()


def pairs_per_s(cfg: C.Config, batch: int, steps: int, warmup: int, metrics: bool | None = True) -> float:
    """metrics: True = deferred read-back (the trainer's way), None = synced every step, False = none."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    net = SimSiam(cfg.model).to(dev)
    if cfg.train.channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = build_optimizer(net, cfg.optim, batch)
    step = SimSiamStep(net, cfg, dev)
    s = cfg.data.image_size
    v1 = torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, device=dev)
    v2 = torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    window = StepMetrics(dev, 1, cfg.train.collapse_guard.rank_rows)
    for i in range(warmup + steps):
        if i == warmup:
            _sync()
            t0 = time.perf_counter()
        loss, z1 = step(v1, v2, gen, i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if metrics:  # what the trainer does: queue every step's metrics, read back every log_every steps
            window.add(i, loss, z1, 0.0)
            if (i + 1) % cfg.train.log_every == 0:
                window.flush()
        elif metrics is None:  # the naive way: read every metric back every step
            loss.item(), effective_rank(z1)
    window.flush()
    _sync()
    return batch * steps / (time.perf_counter() - t0)


def amp_loss_agreement(cfg: C.Config, batch: int) -> dict:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    net = SimSiam(cfg.model).to(dev)
    s = cfg.data.image_size
    v1 = torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, device=dev)
    v2 = torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, device=dev)
    out = {}
    for amp in (False, True):
        c = cfg.replace({"train.amp": amp})
        step = SimSiamStep(net, c, dev)
        gen = torch.Generator(device=dev).manual_seed(1)
        out["bf16" if amp else "fp32"] = step(v1, v2, gen, 0)[0].item()
    out["abs_diff"] = abs(out["bf16"] - out["fp32"])
    return out


def augment_images_per_s(cfg: C.Config, batch: int, reps: int) -> float:
    from simsiam.augment import PhotometricAugment

    dev = torch.device("cuda")
    aug = PhotometricAugment(cfg.data).to(dev)
    s = cfg.data.image_size
    x = torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    for _ in range(3):
        aug(x, generator=gen)
    _sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        aug(x, generator=gen)
    _sync()
    return batch * reps / (time.perf_counter() - t0)


def rank_timing(n: int, d: int, reps: int = 20) -> dict:
    z = torch.randn(n, d, device="cuda")
    res = {}
    for name, fn in (("gram_eigvalsh", lambda: effective_rank(z)),
                     ("svdvals", lambda: torch.linalg.svdvals(z - z.mean(0)).sum().item())):
        fn()
        _sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync()
        res[name + "_ms"] = 1000 * (time.perf_counter() - t0) / reps
    return res


def nccl_syncbn_ddp(cfg: C.Config, batch: int) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        dev = torch.device("cuda")
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(SimSiam(cfg.model)).to(dev)
        net = net.to(memory_format=torch.channels_last)  # before DDP, so gradient buckets match the layout
        model = DDP(net, device_ids=[0])
        opt = build_optimizer(net, cfg.optim, batch)
        step = SimSiamStep(model, cfg, dev)
        s = cfg.data.image_size
        v = torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, device=dev)
        losses = []
        for i in range(5):
            loss, _ = step(v, v.flip(-1), None, i)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        n_sync = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in net.modules())
        return {"ok": all(map(lambda v: v == v, losses)), "losses": losses, "syncbn_layers": n_sync}
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_step: no CUDA device; run this on a GPU machine", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    steps, warmup = (10, 5) if args.quick else (30, 10)
    recipes = {
        "imagenet_resnet50_224": (C.load("imagenet"), 128),
        "cifar10_resnet18_32": (C.load("cifar10"), 512),
    }
    t_start = time.time()
    details: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for name, (cfg, batch) in recipes.items():
        variants = {
            "fp32_nchw": cfg.replace({"train.amp": False, "train.channels_last": False}),
            "bf16_nchw": cfg.replace({"train.amp": True, "train.channels_last": False}),
            "bf16_channels_last": cfg.replace({"train.amp": True, "train.channels_last": True}),
        }
        r = {k: pairs_per_s(c, batch, steps, warmup) for k, c in variants.items()}
        r["bf16_channels_last_no_metrics"] = pairs_per_s(variants["bf16_channels_last"], batch, steps, warmup, False)
        r["bf16_channels_last_metrics_synced_each_step"] = pairs_per_s(variants["bf16_channels_last"], batch, steps,
                                                                       warmup, None)
        r["augment_images_per_s"] = augment_images_per_s(cfg, 2 * batch, 20)
        r["amp_loss"] = amp_loss_agreement(cfg, min(batch, 64))
        details[name] = {"batch": batch, **r}
        print(name, r, flush=True)
    details["effective_rank_256x2048"] = rank_timing(256, 2048)
    details["nccl_syncbn_ddp"] = nccl_syncbn_ddp(C.load("cifar10"), 64)
    main_r = details["imagenet_resnet50_224"]
    out = {
        "name": "gpu_step",
        "metric": "pairs_per_s, ResNet-50 224 px batch 128, full step incl. GPU augmentation + collapse metrics",
        "ours": round(main_r["bf16_channels_last"], 1),
        "baseline": round(main_r["fp32_nchw"], 1),
        "ratio": round(main_r["bf16_channels_last"] / main_r["fp32_nchw"], 3),
        "target": TARGET,
        "config": {"steps": steps, "warmup": warmup, "quick": args.quick},
        "details": details,
        "wall_s": round(time.time() - t_start, 1),
    }
    atomic_write_json(args.out, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
