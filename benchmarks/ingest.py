"""Ingest throughput: training-ready pairs/s - both views fully augmented - of our pipeline against the
reference implementation's loader, on the same shards and the same CPU cores, at 32 px and 224 px;
plus peak memory of a streaming pass at 1x and 10x dataset size.

    python -m benchmarks.ingest --out benchmarks/results/ingest.json [--quick] [--cpus N]

- ours: Ray Data reads the Parquet shards (streaming, file shuffle), decodes and makes the two
  geometric views in map_batches (uint8), iter_train_batches delivers them with prefetch and the seeded
  local shuffle buffer, and the consumer (here the driver, on CPU) applies the batched photometric
  half to both views.
- baseline: a torch DataLoader with one worker per core over the same shards (rows held in memory,
  which only helps it), each worker doing the reference SimSiam code's per-image PIL augmentation
  (TwoCropsTransform of RandomResizedCrop, ColorJitter p=0.8, RandomGrayscale, PIL GaussianBlur p=0.5
  from 64 px up, flip, ToTensor, Normalize).

Both run pinned to the same N cores (sched_setaffinity), one after the other in one run. Throughput
is pairs delivered over whole epochs after a warm-up epoch. Memory: the summed PSS (shared pages
counted once) of the driver and every Ray process, sampled through one streaming epoch, in a fresh
Ray session per size; streaming should keep the 10x peak within 1.3x of the 1x peak.

JSON keys: name, metric, ours, baseline, ratio (ours / baseline, the worse of the two sizes), target,
config; plus cases (per image size, same keys) and memory (peaks at 1x and 10x, their ratio, target).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

TARGET_RATIO = 1.0
MEMORY_TARGET = 1.3


# --------------------------------------------------------------------------- synthetic data


def smooth_images(n: int, size: int, seed: int) -> np.ndarray:
    """Natural-ish uint8 images: upsampled colour fields plus fine noise (compress like photos, not noise)."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.float32)
    rep = size // 4
    img = np.repeat(np.repeat(low, rep, axis=1), rep, axis=2)
    img += rng.normal(0, 12, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_jpeg_folder(root: Path, n: int, seed: int, classes: int = 10) -> None:
    """JPEGs of 256-384 px per side (ImageNet-like sizes) in class folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(256, 385, 2))
        base = smooth_images(1, 64, seed * 100003 + i)[0]
        img = Image.fromarray(base).resize((w, h), Image.BICUBIC)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-10, 11, (h, w, 3))
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / f"c{i % classes}" / f"{i:06d}.jpg",
                                                                    quality=90)


def make_dataset(work: Path, size: int, rows: int, seed: int = 0, shard_rows: int | None = None) -> str:
    from simsiam.data.convert import convert

    dest = work / f"shards_{size}px_{rows}"
    if size <= 64:
        np.savez(work / f"src_{size}_{rows}.npz", images=smooth_images(rows, size, seed),
                 labels=np.arange(rows) % 10)
        convert(work / f"src_{size}_{rows}.npz", dest, shard_rows=shard_rows)
    else:
        src = work / f"src_{size}_{rows}"
        write_jpeg_folder(src, rows, seed)
        convert(src, dest, shard_rows=shard_rows)
    return str(dest)


# --------------------------------------------------------------------------- baseline: reference loader


class _PILGaussianBlur:
    """The reference code's blur: PIL ImageFilter.GaussianBlur with sigma ~ U[0.1, 2]."""

    def __call__(self, img):
        from PIL import ImageFilter

        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


def reference_transform(data_cfg):
    import torchvision.transforms as T

    from simsiam.augment import blur_enabled

    s = data_cfg.color_jitter
    steps = [
        T.RandomResizedCrop(data_cfg.image_size, scale=(data_cfg.crop_min_scale, 1.0)),
        T.RandomApply([T.ColorJitter(s, s, s, s / 4)], p=data_cfg.jitter_prob),
        T.RandomGrayscale(p=data_cfg.grayscale_prob),
    ]
    if blur_enabled(data_cfg):
        steps.append(T.RandomApply([_PILGaussianBlur()], p=0.5))
    steps += [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean=data_cfg.mean, std=data_cfg.std)]
    return T.Compose(steps)


class ShardImages:
    """Map-style dataset over the shards' rows; returns the reference's two augmented crops."""

    def __init__(self, path: str, data_cfg) -> None:
        import pyarrow.parquet as pq

        from simsiam.data.schema import validate_shards

        self.rows = []
        for shard in validate_shards(path).shards:
            t = pq.read_table(shard)
            self.rows += list(zip(t.column("image").to_pylist(), t.column("height").to_pylist(),
                                  t.column("width").to_pylist(), t.column("channels").to_pylist(), strict=True))
        self.transform = reference_transform(data_cfg)
        self.max_pixels = data_cfg.max_pixels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        from simsiam.data.decode import decode

        img = decode(*self.rows[i], self.max_pixels)
        return self.transform(img), self.transform(img)


def run_baseline(path: str, data_cfg, cpus: int, batch: int, epochs: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    ds = ShardImages(path, data_cfg)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, num_workers=cpus,
                        persistent_workers=True, prefetch_factor=2,
                        generator=torch.Generator().manual_seed(0))
    return _timed_epochs(lambda epoch: ((q.shape[0], q, k) for q, k in loader), epochs)


# --------------------------------------------------------------------------- ours


def run_ours(path: str, data_cfg, batch: int, epochs: int) -> dict:
    import torch

    from simsiam.augment import PhotometricAugment
    from simsiam.data.pipeline import iter_train_batches, train_dataset

    ds = train_dataset(data_cfg, path, seed=0)
    photo = PhotometricAugment(data_cfg)
    gen = torch.Generator().manual_seed(0)

    def batches(epoch: int):
        for v1, v2, _ in iter_train_batches(ds, data_cfg, batch, seed=0, epoch=epoch, device="cpu"):
            yield v1.shape[0], photo(v1, gen), photo(v2, gen)

    return _timed_epochs(batches, epochs)


def _timed_epochs(batches, epochs: int) -> dict:
    """Pairs/s over ``epochs`` whole epochs after one warm-up epoch (workers started, caches warm)."""
    for _n, q, k in batches(0):
        assert q.dtype.is_floating_point and k.shape == q.shape
    pairs, t0 = 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        for n, _, _ in batches(epoch):
            pairs += n
    seconds = time.perf_counter() - t0
    return {"pairs": pairs, "seconds": round(seconds, 3), "pairs_per_s": round(pairs / seconds, 2)}


# --------------------------------------------------------------------------- memory


class PeakPSS:
    """Samples the summed PSS of this process and all its descendants (Ray's processes) in a thread."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def sample() -> int:
        import psutil

        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakPSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def memory_pass(path: str, data_cfg, cpus: int, batch: int) -> dict:
    import ray

    from simsiam.augment import PhotometricAugment
    from simsiam.data.pipeline import iter_train_batches, train_dataset

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        time.sleep(2.0)  # let Ray's processes settle before the idle reading
        idle = PeakPSS.sample()
        photo = PhotometricAugment(data_cfg)
        pairs = 0
        with PeakPSS() as mon:
            for v1, v2, _ in iter_train_batches(train_dataset(data_cfg, path, 0), data_cfg, batch, 0, 0, "cpu"):
                photo(v1), photo(v2)
                pairs += v1.shape[0]
        return {"pairs": pairs, "idle_mib": round(idle / 2**20, 1), "peak_mib": round(mon.peak / 2**20, 1)}
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ingest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument("--quick", action="store_true", help="small datasets (a few minutes on 2 cores)")
    p.add_argument("--cpus", type=int, default=None, help="cores for both loaders (default: all available)")
    p.add_argument("--sizes", default="32,224", help="image sizes to compare (empty: memory check only)")
    p.add_argument("--skip-memory", action="store_true", help="throughput only")
    p.add_argument("--work", help="directory for the generated shards (default: a temp dir)")
    args = p.parse_args(argv)

    import torch

    from simsiam.config import DataConfig
    from simsiam.io import atomic_write_json

    available = sorted(os.sched_getaffinity(0))
    cpus = min(args.cpus or len(available), len(available))
    os.sched_setaffinity(0, available[:cpus])  # inherited by DataLoader workers and Ray's processes
    # The consumer shares the cores with the loader; one intra-op thread avoids OpenMP spin-waits
    # against the data tasks (the baseline's workers are single-threaded too).
    torch.set_num_threads(1)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    rows = {32: 8192 if args.quick else 50_000, 224: 768 if args.quick else 4096}
    epochs = {32: 2, 224: 1} if args.quick else {32: 3, 224: 2}
    batch = 256
    t_start = time.time()
    tmp = tempfile.TemporaryDirectory(prefix="simsiam-ingest-") if not args.work else None
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    cases = []
    try:
        paths = {}
        for s in sizes:
            n = rows.get(s, rows[224] if s > 64 else rows[32])
            print(f"[ingest] generating {n} images at {s} px", file=sys.stderr, flush=True)
            paths[s] = make_dataset(work, s, n)
        cfgs = {s: DataConfig(image_size=s, eval_resize=1.0 if s <= 64 else 256 / 224,
                              mean=[0.4914, 0.4822, 0.4465] if s <= 64 else [0.485, 0.456, 0.406],
                              std=[0.247, 0.2435, 0.2616] if s <= 64 else [0.229, 0.224, 0.225]) for s in sizes}
        # Baselines first: DataLoader forks its workers, which must not happen inside a Ray driver.
        base = {}
        for s in sizes:
            print(f"[ingest] baseline (torch DataLoader, {cpus} workers) at {s} px", file=sys.stderr, flush=True)
            base[s] = run_baseline(paths[s], cfgs[s], cpus, batch, epochs.get(s, 1))
        import ray

        if sizes:
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            for s in sizes:
                print(f"[ingest] ours (Ray Data + batched photometric) at {s} px", file=sys.stderr, flush=True)
                ours = run_ours(paths[s], cfgs[s], batch, epochs.get(s, 1))
                ratio = ours["pairs_per_s"] / base[s]["pairs_per_s"]
                cases.append({
                    "name": f"ingest_{s}px", "metric": "training-ready pairs/s (two fully augmented views)",
                    "ours": ours["pairs_per_s"], "baseline": base[s]["pairs_per_s"], "ratio": round(ratio, 3),
                    "target": TARGET_RATIO,
                    "config": {"image_size": s, "rows": rows.get(s), "timed_epochs": epochs.get(s, 1),
                               "batch_size": batch, "cpus": cpus,
                               "storage": "raw uint8" if s <= 64 else "JPEG 256-384 px",
                               "ours_detail": ours, "baseline_detail": base[s]},
                })
                print(f"[ingest]   {s} px: ours {ours['pairs_per_s']:.1f} pairs/s, baseline "
                      f"{base[s]['pairs_per_s']:.1f} pairs/s, ratio {ratio:.2f}", file=sys.stderr, flush=True)
        finally:
            ray.shutdown()

        memory = None
        if not args.skip_memory:
            m_rows = 4096 if args.quick else 20_000
            m_size = 32
            # Fixed shard size: a dataset grows by more shards (the converter caps shards at 64 MiB), so
            # 10x the data is 10x the shards here too.
            m_shard_rows = 512
            cfg = DataConfig(image_size=m_size, eval_resize=1.0)
            peaks = {}
            for mult in (1, 10):
                path = make_dataset(work, m_size, m_rows * mult, seed=1, shard_rows=m_shard_rows)
                print(f"[ingest] memory: streaming pass over {m_rows * mult} rows", file=sys.stderr, flush=True)
                peaks[f"{mult}x"] = memory_pass(path, cfg, cpus, batch)
            ratio = peaks["10x"]["peak_mib"] / peaks["1x"]["peak_mib"]
            growth = [v["peak_mib"] - v["idle_mib"] for v in (peaks["1x"], peaks["10x"])]
            memory = {"name": "ingest_memory_streaming",
                      "metric": "peak summed PSS (MiB) of the driver and all Ray processes during one epoch",
                      "ours": {k: v["peak_mib"] for k, v in peaks.items()}, "ratio": round(ratio, 3),
                      "ratio_above_idle": round(growth[1] / max(growth[0], 1e-9), 3),
                      "target": MEMORY_TARGET, "passed": ratio <= MEMORY_TARGET,
                      "config": {"image_size": m_size, "rows_1x": m_rows, "rows_10x": 10 * m_rows,
                                 "shard_rows": m_shard_rows, "batch_size": batch, "cpus": cpus, "detail": peaks}}
            print(f"[ingest]   memory peak 1x {peaks['1x']['peak_mib']} MiB, 10x {peaks['10x']['peak_mib']} MiB, "
                  f"ratio {ratio:.2f}", file=sys.stderr, flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()

    worst = min(cases, key=lambda c: c["ratio"]) if cases else {"ours": None, "baseline": None, "ratio": None,
                                                                 "name": None}
    result = {
        "name": "ingest",
        "metric": "training-ready pairs/s, ours vs the reference per-image PIL DataLoader; ratio = ours / "
                  "baseline at the image size where it is lowest",
        "ours": worst["ours"], "baseline": worst["baseline"], "ratio": worst["ratio"], "target": TARGET_RATIO,
        "passed": bool(cases) and all(c["ratio"] >= TARGET_RATIO for c in cases)
        and (memory is None or memory["passed"]),
        "config": {"quick": args.quick, "cpus": cpus, "sizes": sizes, "batch_size": batch,
                   "device": "cpu", "torch_threads_consumer": 1, "wall_s": round(time.time() - t_start, 1),
                   "worst_case": worst["name"]},
        "cases": cases,
        "memory": memory,
    }
    atomic_write_json(args.out, result)
    print(f"[ingest] wrote {args.out}: ratio {result['ratio']} (target >= {TARGET_RATIO})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
