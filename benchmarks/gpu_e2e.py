"""End to end against the compute limit on one GPU: Parquet shards -> Ray Data -> Ray Train, per recipe.

The whole GPU measurement, one command (one GPU, under 8 minutes on an H200):

    python -m benchmarks.gpu_e2e --out benchmarks/results/gpu_e2e.json

CPU dry run (tiny sizes, a minute or two; its JSON says ``"device": "cpu"`` - not GPU figures, do not
commit it as results/gpu_e2e.json):

    python -m benchmarks.gpu_e2e --out /tmp/gpu_e2e_cpu.json --quick

Per recipe - cifar10 (ResNet-18, CIFAR stem, 32 px PNG shards, batch 512) and imagenet (ResNet-50,
224 px crops of ~500x375 JPEG shards, per-GPU batch 128); shards generated synthetically here - and
in one process tree on one device, side by side:

- compute limit: the project's training step (:class:`simsiam.step.SimSiamStep`: photometric
  augmentation on the device, forward, loss) plus backward, SGD and the trainer's deferred metrics, on
  uint8 views already resident on the device, at the trainer's settings (bf16 autocast,
  channels_last, cudnn.benchmark on GPU).
- end to end: real 1-worker ``simsiam run``-style Ray Train runs (:func:`simsiam.train.pretrain`) over
  the shards through Ray Data, once per ``data.decode`` mode that applies (cpu; gpu for JPEG data) and
  per ``data.prefetch_batches`` depth; steady-state pairs/s = median of the epochs after the first.

ratio = best end to end / compute limit; target >= 0.9 for both recipes. The top level reports the
recipe with the worse ratio.

Compute-limit levers (issue 13's item 2), each measured on the compute-limit loop and recorded with
its gain over the trainer's settings under ``levers``: cudnn.benchmark off (to show what it buys),
SGD for-loop / foreach / fused, a larger per-GPU batch, metrics read back every step (host syncs)
against the trainer's deferred read-back, torch.compile of the model, and torch.compile
``mode="reduce-overhead"`` (CUDA graphs; static shapes), torch.compile of the photometric augmentation.
``--levers`` picks a subset; levers that
cannot run here (CUDA-only, or compile under --quick) are listed under ``levers.not_measured`` with
the reason, so no figure is mistaken for measured.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from simsiam import config as C
from simsiam.io import atomic_write_json

TARGET = 0.9
LEVERS = ("cudnn_benchmark_off", "sgd_for_loop", "sgd_fused", "batch_x2", "metrics_synced_each_step",
          "compile", "compile_cudagraphs", "compile_augment")
# Levers start only before this many seconds into the run, to keep the whole script under 8 minutes.
LEVER_DEADLINE_S = 390
CUDA_ONLY = {"cudnn_benchmark_off": "cuDNN is CUDA-only", "compile_cudagraphs": "CUDA graphs need CUDA"}


# --------------------------------------------------------------------------- synthetic shards


def _photo(seed: int, h: int, w: int) -> np.ndarray:
    """A photo-like uint8 (h, w, 3) image: smooth colour fields plus fine noise (compresses like a photo)."""
    from PIL import Image

    from benchmarks.ingest import smooth_images

    rng = np.random.default_rng(seed)
    base = Image.fromarray(smooth_images(1, 64, seed)[0]).resize((w, h), Image.BICUBIC)
    arr = np.asarray(base).astype(np.int16) + rng.integers(-10, 11, (h, w, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def _write_images(args: tuple) -> None:
    from PIL import Image

    root, fmt, size, start, stop, classes = args
    for i in range(start, stop):
        if fmt == "JPEG":
            # ~500x375 landscape or ~375x500 portrait, +-10%: ImageNet's typical photo.
            rng = np.random.default_rng(i)
            long, short = int(500 * rng.uniform(0.9, 1.1)), int(375 * rng.uniform(0.9, 1.1))
            h, w = (short, long) if i % 4 else (long, short)
            img, name = _photo(i, h, w), f"{i:07d}.jpg"
        else:
            img, name = _photo(i, size, size), f"{i:07d}.png"
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        (Path(root) / f"c{i % classes}" / name).write_bytes(buf.getvalue())


def make_shards(work: Path, fmt: str, size: int, rows: int, workers: int) -> str:
    """``rows`` synthetic images (PNG of size x size, or JPEG of ~500x375) converted to Parquet shards."""
    from simsiam.data.convert import convert

    src, dest = work / f"src_{fmt}_{size}_{rows}", work / f"shards_{fmt}_{size}_{rows}"
    for c in range(10):
        (src / f"c{c}").mkdir(parents=True, exist_ok=True)
    step = max(1, -(-rows // max(1, workers)))
    jobs = [(str(src), fmt, size, a, min(rows, a + step), 10) for a in range(0, rows, step)]
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(_write_images, jobs))
    convert(src, dest, workers=workers)
    return str(dest)


# --------------------------------------------------------------------------- compute limit


def _sgd(net: torch.nn.Module, cfg: C.Config, batch: int, impl: str) -> torch.optim.Optimizer:
    """The trainer's optimiser (:func:`simsiam.optim.build_optimizer`) with the SGD implementation
    picked: ``default`` (torch's choice: foreach on CUDA), ``for_loop``, ``foreach`` or ``fused``."""
    from simsiam.optim import build_optimizer

    opt = build_optimizer(net, cfg.optim, batch)
    if impl == "default":
        return opt
    groups = [{k: v for k, v in g.items() if k not in ("foreach", "fused")} for g in opt.param_groups]
    return torch.optim.SGD(groups, lr=groups[0]["lr"], foreach=impl == "foreach", fused=impl == "fused")


def compute_limit(cfg: C.Config, batch: int, steps: int, warmup: int, device: torch.device, **lever) -> float:
    """Pairs/s of the trainer's step on views already on ``device``; ``lever``: see :func:`_step_loop`.
    The GPU memory it used goes back to the device afterwards, for the Ray Train runs that follow."""
    try:
        return _step_loop(cfg, batch, steps, warmup, device, **lever)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _step_loop(cfg: C.Config, batch: int, steps: int, warmup: int, device: torch.device, *,
               sgd: str = "default", cudnn_benchmark: bool = True, metrics: str = "deferred",
               compile_mode: str | None = None, compile_augment: bool = False) -> float:
    """metrics: deferred = the trainer's read-back every log_every steps, synced = every step."""
    from simsiam.metrics import effective_rank
    from simsiam.model import SimSiam
    from simsiam.step import SimSiamStep, StepMetrics

    on_gpu = device.type == "cuda"
    saved_bench = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = cudnn_benchmark and on_gpu
    try:
        torch.manual_seed(0)
        net = SimSiam(cfg.model).to(device)
        if on_gpu and cfg.train.channels_last:
            net = net.to(memory_format=torch.channels_last)
        opt = _sgd(net, cfg, batch, sgd)
        model = torch.compile(net, mode=compile_mode) if compile_mode is not None else net
        step = SimSiamStep(model, cfg, device)
        if compile_augment:
            step.augment = torch.compile(step.augment)
        s = cfg.data.image_size
        gen = torch.Generator(device=device).manual_seed(0)
        v1 = torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, device=device, generator=gen)
        v2 = torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, device=device, generator=gen)
        window = StepMetrics(device, 1, cfg.train.collapse_guard.rank_rows)
        for i in range(warmup + steps):
            if i == warmup:
                _sync(device)
                t0 = time.perf_counter()
            if compile_mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            loss, z1 = step(v1, v2, gen, i)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if metrics == "synced":
                loss.item(), effective_rank(z1)
            else:
                window.add(i, loss, z1, 0.0)
                if (i + 1) % cfg.train.log_every == 0:
                    window.flush()
        window.flush()
        _sync(device)
        return batch * steps / (time.perf_counter() - t0)
    finally:
        torch.backends.cudnn.benchmark = saved_bench


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_levers(cfg: C.Config, batch: int, steps: int, warmup: int, device: torch.device,
                   levers: list[str], quick: bool, base: float, deadline: float = float("inf")) -> dict:
    """Each lever alone on the compute-limit loop, against the trainer's settings (``base`` pairs/s)."""
    variants = {
        "cudnn_benchmark_off": dict(cudnn_benchmark=False),
        "sgd_for_loop": dict(sgd="for_loop"),
        "sgd_fused": dict(sgd="fused"),
        "batch_x2": dict(batch=2 * batch),
        "metrics_synced_each_step": dict(metrics="synced"),
        "compile": dict(compile_mode="default"),
        "compile_cudagraphs": dict(compile_mode="reduce-overhead"),
        "compile_augment": dict(compile_augment=True),
    }
    out: dict = {"baseline_pairs_per_s": round(base, 1), "results": {}, "not_measured": {}}
    for name in levers:
        if device.type != "cuda" and name in CUDA_ONLY:
            out["not_measured"][name] = CUDA_ONLY[name]
            continue
        if time.time() > deadline:
            out["not_measured"][name] = "skipped: the run's time budget (8 min on an H200) was spent"
            continue
        if quick and name.startswith("compile"):
            out["not_measured"][name] = "compilation takes minutes on CPU; measured in the full (GPU) run"
            continue
        kw = dict(variants[name])
        b = kw.pop("batch", batch)
        try:
            v = compute_limit(cfg, b, steps, warmup, device, **kw)
        except Exception as e:  # noqa: BLE001 - one lever failing must not lose the others' figures
            out["not_measured"][name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            continue
        out["results"][name] = {"pairs_per_s": round(v, 1), "gain": round(v / base, 3), "batch": b}
        print(f"  lever {name}: {v:.1f} pairs/s ({v / base:.2f}x)", flush=True)
    out["measured"] = sorted(out["results"])
    return out


# --------------------------------------------------------------------------- end to end


def end_to_end(cfg: C.Config, path: str, storage: str, name: str) -> dict:
    """One Ray Train run over the shards; its per-epoch pairs/s and the steady-state median."""
    from simsiam.run import RunSpec
    from simsiam.train import pretrain

    t0 = time.perf_counter()
    res = pretrain(RunSpec(cfg.replace({"run.name": name}), path, None, storage))
    rates = [h.pairs_per_s for h in res.history]
    steady = statistics.median(rates[1:]) if len(rates) > 1 else (rates[0] if rates else 0.0)
    out = {"status": res.status, "pairs_per_s": round(steady, 1), "per_epoch": [round(r, 1) for r in rates],
           "decode": cfg.data.decode, "prefetch_batches": cfg.data.prefetch_batches,
           "wall_s": round(time.perf_counter() - t0, 1)}
    if res.status != "finished":
        out["reason"] = res.reason
    print(f"  e2e {name}: {out['pairs_per_s']} pairs/s ({res.status}) per epoch {out['per_epoch']}", flush=True)
    return out


def recipes(quick: bool, on_gpu: bool) -> dict:
    """name -> (config, image format, rows, steps per epoch). Quick runs shrink model, size and batch."""
    common = {"train.num_workers": 1, "train.use_gpu": on_gpu, "train.knn_every": 0, "eval.enabled": False,
              "train.collapse_guard.enabled": False, "train.epochs": 3, "train.log_every": 10,
              "train.cpus_per_worker": 2.0 if on_gpu else 0.5}
    if not quick:
        return {
            "cifar10_resnet18_32": (C.load("cifar10", {**common, "optim.batch_size": 512}), "PNG", 512 * 16, 16),
            "imagenet_resnet50_224": (C.load("imagenet", {**common, "optim.batch_size": 128,
                                                          "train.checkpoint_every": 3}), "JPEG", 128 * 16, 16),
        }
    tiny = {**common, "model.backbone": "small", "model.small_width": 8, "model.dim": 64, "model.pred_dim": 16,
            "model.proj_layers": 2, "train.epochs": 2, "data.data_cpus": 1.0, "data.shuffle_buffer": 0,
            "train.log_every": 2}
    return {
        "cifar10_resnet18_32": (C.load("cifar10", {**tiny, "optim.batch_size": 16}), "PNG", 16 * 4, 4),
        "imagenet_resnet50_224": (C.load("imagenet", {**tiny, "optim.batch_size": 8, "data.image_size": 32,
                                                      "data.blur": "off"}), "JPEG", 8 * 3, 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--quick", action="store_true",
                   help="tiny models, sizes and runs: a CPU dry run of the whole script (figures are not GPU's)")
    p.add_argument("--levers", default=",".join(LEVERS),
                   help=f"comma-separated compute-limit levers to measure on the imagenet recipe ('' = none); "
                        f"known: {', '.join(LEVERS)}")
    p.add_argument("--prefetch", default="1,2,4",
                   help="data.prefetch_batches depths for the end-to-end runs of the fastest decode mode")
    args = p.parse_args(argv)
    levers = [x for x in args.levers.split(",") if x]
    unknown = set(levers) - set(LEVERS)
    if unknown:
        p.error(f"--levers: unknown {', '.join(sorted(unknown))}; known: {', '.join(LEVERS)}")
    depths = [int(x) for x in args.prefetch.split(",") if x]

    import ray

    from simsiam.data.device_decode import resolve

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.quick:
        print("gpu_e2e: no CUDA device; run this on a GPU machine, or use --quick for a CPU dry run",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if on_gpu else "cpu")
    if not on_gpu:
        # The compute limit gets the threads a train worker gets (Ray sets OMP_NUM_THREADS from its CPUs).
        torch.set_num_threads(1)
    cpus = os.cpu_count() or 1
    steps, warmup = (5, 2) if args.quick else (30, 10)
    t_start = time.time()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="gpu_e2e-") as work:
        work_p = Path(work)
        own_ray = not ray.is_initialized()  # the test runs it on its shared cluster
        if own_ray:
            # The dashboard serves the state API that Ray Train's placement-group cleaner polls.
            ray.init(address="local", num_cpus=min(cpus, 2) if args.quick else cpus, num_gpus=1 if on_gpu else 0,
                     include_dashboard=True, dashboard_host="127.0.0.1")
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            for name, (cfg, fmt, rows, spe) in recipes(args.quick, on_gpu).items():
                print(f"{name}: {rows} {fmt} rows", flush=True)
                t0 = time.perf_counter()
                path = make_shards(work_p, fmt, cfg.data.image_size, rows, min(cpus, 16))
                shards_s = time.perf_counter() - t0
                batch = cfg.optim.batch_size
                cfg = cfg.replace({"data.path": path, "data.eval_path": "", "train.max_steps_per_epoch": spe})
                limit = compute_limit(cfg, batch, steps, warmup, device)
                print(f"  compute limit: {limit:.1f} pairs/s", flush=True)
                # Device decode applies where auto would pick it on a GPU: JPEG data.
                modes = ["cpu"] + (["gpu"] if resolve(_with(cfg, decode="auto").data, path, use_gpu=True) == "gpu"
                                   else [])
                e2e = {}
                for mode in modes:
                    c = _with(cfg, decode=mode)
                    e2e[f"decode_{mode}_prefetch_{c.data.prefetch_batches}"] = end_to_end(
                        c, path, str(work_p / "runs"), f"{name}-{mode}")
                best_mode = max(modes, key=lambda m: e2e[f"decode_{m}_prefetch_{cfg.data.prefetch_batches}"]
                                ["pairs_per_s"])
                for depth in depths:
                    key = f"decode_{best_mode}_prefetch_{depth}"
                    if key not in e2e and not args.quick:
                        e2e[key] = end_to_end(_with(cfg, decode=best_mode, prefetch=depth), path,
                                              str(work_p / "runs"), f"{name}-{best_mode}-p{depth}")
                best_key = max(e2e, key=lambda k: e2e[k]["pairs_per_s"])
                best = e2e[best_key]["pairs_per_s"]
                results[name] = {
                    "name": f"gpu_e2e/{name}",
                    "metric": "pairs_per_s: end to end (best decode mode and prefetch depth) / compute limit",
                    "ours": best,
                    "baseline": round(limit, 1),
                    "ratio": round(best / limit, 4) if limit else None,
                    "target": TARGET,
                    "config": {"backbone": cfg.model.backbone, "image_size": cfg.data.image_size, "batch": batch,
                               "source_format": fmt, "rows": rows, "steps_per_epoch": spe,
                               "epochs": cfg.train.epochs, "amp": cfg.train.amp,
                               "channels_last": cfg.train.channels_last, "best_e2e": best_key},
                    "end_to_end": e2e,
                    "shards_s": round(shards_s, 1),
                }
                if name.startswith("imagenet") and levers:
                    results[name]["levers"] = measure_levers(cfg, batch, steps, warmup, device, levers,
                                                             args.quick, limit, deadline=t_start + LEVER_DEADLINE_S)
        finally:
            if own_ray:
                ray.shutdown()
    worst = min(results.values(), key=lambda r: r["ratio"] or 0.0)
    out = {
        "name": "gpu_e2e",
        "metric": f"pairs_per_s end to end / compute limit on one device (worst recipe: {worst['name']})",
        "ours": worst["ours"],
        "baseline": worst["baseline"],
        "ratio": worst["ratio"],
        "target": TARGET,
        "device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
        "config": {"quick": args.quick, "steps": steps, "warmup": warmup, "cpus": cpus, "levers": levers,
                   "prefetch_depths": depths, "torch": torch.__version__},
        "recipes": results,
        "wall_s": round(time.time() - t_start, 1),
    }
    if not on_gpu:
        out["note"] = "CPU dry run (--quick): checks the script end to end; these are not GPU figures"
    atomic_write_json(args.out, out)
    print(f"gpu_e2e: worst ratio {out['ratio']} (target >= {TARGET}) on {out['device']} -> {args.out}")
    return 0


def _with(cfg: C.Config, decode: str, prefetch: int | None = None) -> C.Config:
    o = {"data.decode": decode}
    if prefetch is not None:
        o["data.prefetch_batches"] = prefetch
    return cfg.replace(o)


if __name__ == "__main__":
    sys.exit(main())
