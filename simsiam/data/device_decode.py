"""Decoding JPEG training rows on the train worker's device (``data.decode: gpu``).

At 224 px a GPU consumes ~4,000 decoded JPEGs per second, while PIL decodes ~400 per CPU core. In this
mode the Ray Data tasks only read each JPEG's header and draw the two views' crop boxes and flips
(:func:`simsiam.data.batches.train_batch_encoded`, the same draws as the CPU path, from the same
seed); the encoded bytes travel to the worker, which decodes a whole batch at once with torchvision's
``decode_jpeg`` (nvjpeg on CUDA, libjpeg-turbo on CPU) and crops, resizes and flips on the device.

The resize computes PIL's own antialiased bilinear coefficients (the CPU path's ``resize(box=...)``,
including the pixels just outside the box that PIL's filter reads) and applies them as float32 matrix
products, the same code on every device, so what the CPU tests check is what runs on the GPU; the
views differ from the CPU path's by PIL's fixed-point rounding only (the test states the bound).
``F.interpolate(antialias=True)`` on the cropped patch was measured first: it clamps at the box edge,
which moved border pixels by up to 23 levels at 32 px.

:func:`resolve` turns ``data.decode: auto`` into ``cpu`` or ``gpu`` once, on the driver.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from simsiam.config import DataConfig
from simsiam.data.schema import DataError, filesystem, plain_data_errors, validate_shards

__all__ = ["resolve", "sample_format", "decode_views", "iter_views"]


def sample_format(path: str, max_rows: int = 8) -> tuple[str, str]:
    """(format, where) of the first readable image of the dataset's first non-empty shard: PIL's format
    name (``"JPEG"``, ``"PNG"``...), ``"raw pixels"``, or ``"unreadable"`` when none of its first
    ``max_rows`` rows has a readable header; ``where`` names the shard and row. Reads one small batch."""
    import pyarrow.parquet as pq

    from simsiam.data.decode import BadImage, probe

    for shard in validate_shards(path, "data.path").shards:
        fs, inner = filesystem(shard)
        with fs.open_input_file(inner) as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in ("image", "id", "height") if c in pf.schema_arrow.names]
            table = next(pf.iter_batches(batch_size=max_rows, columns=cols), None)
        if table is None or table.num_rows == 0:
            continue
        rows = table.to_pydict()
        heights = rows.get("height") or [None] * table.num_rows
        for i, data in enumerate(rows["image"]):
            where = f"{shard}: row id={rows['id'][i]!r}"
            if heights[i] is not None:
                return "raw pixels", where
            try:
                return probe(data, 1 << 62)[0], where
            except BadImage:
                continue  # a bad row says nothing about the format; the pipeline reports it
        return "unreadable", f"{shard}: first {table.num_rows} rows"
    return "unreadable", f"{path}: every shard"


def resolve(data_cfg: DataConfig, path: str, use_gpu: bool) -> str:
    """``cpu`` or ``gpu``: ``data.decode`` with ``auto`` decided (gpu when the workers have GPUs and the
    data is JPEG). An explicit ``gpu`` on data that is not JPEG is refused here, before any task runs.
    An explicit ``gpu`` without GPUs decodes in the worker on its CPU (the path the tests run)."""
    if data_cfg.decode == "cpu" or (data_cfg.decode == "auto" and not use_gpu):
        return "cpu"
    fmt, where = sample_format(path)
    if fmt == "JPEG":
        return "gpu"
    if data_cfg.decode == "auto":
        return "cpu"
    held = {"raw pixels": "raw pixels", "unreadable": "no readable image header"}.get(fmt, f"a {fmt} image")
    raise DataError(f"data.decode=gpu: {where} holds {held}, but GPU decode reads only JPEG; use "
                    "data.decode=cpu (or auto, which picks cpu for data that is not JPEG)")


def _decode_all(data: list[torch.Tensor], where: list[str], device: torch.device,
                on_bad_image: str) -> tuple[list[torch.Tensor | None], int]:
    """Batched decode; on failure decode one by one to name (or, under skip, drop) the bad images."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not data:
        return [], 0
    with warnings.catch_warnings():
        # torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec (not a dependency
        # here); the warning would repeat in every worker's log.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device)), 0
        except RuntimeError:
            pass
        out: list[torch.Tensor | None] = []
        bad = 0
        for d, w in zip(data, where, strict=True):
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as e:
                if on_bad_image != "skip":
                    # torchvision's message starts with its source location; the last part is the reason.
                    reason = str(e).strip().splitlines()[0].rsplit(", ", 1)[-1] or type(e).__name__
                    raise DataError(f"{w}: corrupt or truncated JPEG (decode on {device.type} failed: {reason})"
                                    ) from None
                out.append(None)
                bad += 1
    return out, bad


def _to_device(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host array on ``device``; to CUDA through pinned memory without blocking, because a
    pageable copy would wait for the previous step's kernels and stall the host once per batch."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _axis_weights(in_size: np.ndarray, start: np.ndarray, length: np.ndarray, out: int,
                  device: torch.device) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """PIL's antialiased bilinear coefficients along one axis for V boxes, as PIL computes them
    (``precompute_coeffs`` in its Resample.c): output pixel o of box v samples the image around
    ``start + (o + 0.5) x scale`` with a triangle filter widened by ``max(scale, 1)``, taps clipped to the
    whole image (not to the box: PIL's ``resize(box=...)`` reads the pixels just outside the box).

    Returns (weights (V, out, W) float32 on ``device``, window start (V,), window width (V,)), where the
    window is the span of image pixels any output pixel of that box reads."""
    scale = length / out
    support = np.maximum(scale, 1.0)  # bilinear support 1, scaled when downsampling
    first = np.maximum((start + 0.5 * scale - support + 0.5).astype(np.int64), 0)
    last = np.minimum((start + (out - 0.5) * scale + support + 0.5).astype(np.int64), in_size.astype(np.int64))
    width = last - first
    params = _to_device(np.stack([in_size, start, scale, support, first]).astype(np.float64), device)
    in_size_t, start_t, scale_t, support_t, first_t = (p.view(-1, 1, 1) for p in params)
    o = torch.arange(out, dtype=torch.float64, device=device).view(1, -1, 1)
    pos = first_t + torch.arange(int(width.max()), dtype=torch.float64, device=device).view(1, 1, -1)
    centre = start_t + (o + 0.5) * scale_t
    lo = torch.trunc(centre - support_t + 0.5).clamp_(min=0.0)
    hi = torch.minimum(torch.trunc(centre + support_t + 0.5), in_size_t)
    w = (1.0 - ((pos - centre + 0.5) / support_t).abs()).clamp_(min=0.0) * ((pos >= lo) & (pos < hi))
    return (w / w.sum(dim=-1, keepdim=True)).to(torch.float32), first, width


def crop_resize_flip(images: list[torch.Tensor], crop: np.ndarray, flip: np.ndarray, size: int,
                     device: torch.device) -> torch.Tensor:
    """Decoded (3, H, W) uint8 images, per-view boxes (N, V, 4) = (top, left, h, w) and flips (N, V) ->
    (V, N, 3, size, size) uint8 on ``device`` (the images' device).

    The resize is PIL's antialiased bilinear ``resize(box=...)`` (the CPU path's) as two float32 matrix
    products per view, horizontal then vertical with the intermediate rounded to uint8 as PIL does;
    what differs from PIL is its fixed-point arithmetic (22-bit coefficients), so views match within
    a few levels at most (tests/test_device_decode.py states the bound)."""
    n, views = crop.shape[:2]
    out = torch.empty((views, n, 3, size, size), dtype=torch.float32, device=device)
    if n:
        boxes = crop.reshape(-1, 4).astype(np.float64)  # row-major: image i, view v at i * views + v
        heights = np.repeat([img.shape[1] for img in images], views).astype(np.float64)
        widths = np.repeat([img.shape[2] for img in images], views).astype(np.float64)
        ky, y0, hy = _axis_weights(heights, boxes[:, 0], boxes[:, 2], size, device)
        kx, x0, wx = _axis_weights(widths, boxes[:, 1], boxes[:, 3], size, device)
        saved = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")  # TF32 would round the weights to 10 bits
        try:
            for k in range(n * views):
                i, v = divmod(k, views)
                patch = images[i][:, y0[k]:y0[k] + hy[k], x0[k]:x0[k] + wx[k]].to(torch.float32)
                rows = torch.matmul(patch, kx[k, :, :wx[k]].T).add_(0.5).floor_().clamp_(0.0, 255.0)
                torch.matmul(ky[k, :, :hy[k]], rows, out=out[v, i])
        finally:
            torch.set_float32_matmul_precision(saved)
    out = out.add_(0.5).floor_().clamp_(0.0, 255.0).to(torch.uint8)
    flips = _to_device(flip.T, device)  # (V, N)
    return torch.where(flips.view(views, n, 1, 1, 1), out.flip(-1), out)


def decode_views(batch: dict[str, Any], image_size: int, device: torch.device | str,
                 on_bad_image: str = "error") -> tuple[torch.Tensor, torch.Tensor, int]:
    """One batch from :func:`~simsiam.data.batches.train_batch_encoded` (numpy columns) -> (view1, view2,
    n_skipped) uint8 (N, 3, S, S) on ``device``; rows bad in the task or at decode are dropped and counted."""
    device = torch.device(device)
    valid = np.asarray(batch["valid"], bool)
    keep = np.flatnonzero(valid)
    data = [torch.frombuffer(bytearray(batch["image"][i]), dtype=torch.uint8) for i in keep]
    where = [str(batch["where"][i]) for i in keep]
    decoded, n_bad = _decode_all(data, where, device, on_bad_image)
    ok = [j for j, img in enumerate(decoded) if img is not None]
    rows = keep[ok]
    views = crop_resize_flip([decoded[j] for j in ok], np.asarray(batch["crop"])[rows],
                             np.asarray(batch["flip"])[rows], image_size, device)
    return views[0], views[1], int(len(valid) - len(keep)) + n_bad


def iter_views(shard: Any, data_cfg: DataConfig, batch_size: int, seed: int, epoch: int,
               device: torch.device | str) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """The ``data.decode: gpu`` form of :func:`simsiam.data.pipeline.iter_train_batches` (same contract):
    Ray Data prefetches encoded batches on its threads; each is decoded and cropped here, on ``device``."""
    buffer = data_cfg.shuffle_buffer or None
    for batch in plain_data_errors(shard.iter_batches(
        batch_size=batch_size, batch_format="numpy", drop_last=True, local_shuffle_buffer_size=buffer,
        local_shuffle_seed=(seed + epoch) if buffer else None, prefetch_batches=data_cfg.prefetch_batches,
    )):
        yield decode_views(batch, data_cfg.image_size, device, data_cfg.on_bad_image)
