"""Look inside a shard dataset: schema, counts per class, shards and sizes, repeated ids, and PNG grids
of samples and of augmented view pairs; with :func:`check_rows`, decode every row as training would.
Reads with pyarrow directly (no Ray), so it is quick on any machine."""
from __future__ import annotations

import io
import math
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from simsiam.config import DataConfig
from simsiam.data.decode import BadImage, decode
from simsiam.data.schema import (
    DataError,
    describe_duplicates,
    duplicate_ids,
    filesystem,
    read_metadata,
    validate_shards,
)
from simsiam.io import atomic_write_bytes

_HEADER_SAMPLE = 256  # encoded images whose headers are read for the size statistics
_MIN_TILE = 64        # tiny images (8 px digits) are enlarged to at least this for viewing


def _open(shard: str) -> pq.ParquetFile:
    fs, inner = filesystem(shard)
    return pq.ParquetFile(fs.open_input_file(inner))


def _label_name(label: int, class_names: list[str]) -> str:
    if label < 0:
        return "unlabeled"
    return class_names[label] if label < len(class_names) else str(label)


def summarize(path: str) -> dict[str, Any]:
    """Schema, rows, per-class counts, per-shard rows/bytes/row groups and image size statistics."""
    found = validate_shards(path, "PATH")
    try:
        meta = read_metadata(path)
    except DataError:
        meta = None
    class_names = list(meta.get("class_names", [])) if meta else []
    shards, counts = [], {}
    raw_h, raw_w, encoded = [], [], []
    schema = None
    for shard in found.shards:
        fs, inner = filesystem(shard)
        pf = _open(shard)
        schema = schema or pf.schema_arrow
        md = pf.metadata
        shards.append({"file": shard, "rows": md.num_rows, "row_groups": md.num_row_groups,
                       "bytes": fs.get_file_info(inner).size})
        cols = [c for c in ("label", "height", "width") if c in pf.schema_arrow.names]
        t = pf.read(columns=cols)
        for v, c in zip(*np.unique(t.column("label").fill_null(-1).to_numpy(), return_counts=True), strict=True):
            counts[int(v)] = counts.get(int(v), 0) + int(c)
        if "height" in cols:
            h = t.column("height").to_numpy(zero_copy_only=False)
            w = t.column("width").to_numpy(zero_copy_only=False)
            is_raw = ~np.isnan(h.astype(float))
            raw_h += h[is_raw].astype(int).tolist()
            raw_w += w[is_raw].astype(int).tolist()
            if (~is_raw).any():
                encoded.append(shard)
        else:
            encoded.append(shard)
    formats: dict[str, int] = {}
    enc_h, enc_w = [], []
    for shard in encoded:
        if len(enc_h) >= _HEADER_SAMPLE:
            break
        t = _open(shard).read_row_group(0, columns=["image"])
        for data in t.column("image").to_pylist()[: _HEADER_SAMPLE - len(enc_h)]:
            try:
                img = Image.open(io.BytesIO(data))
                formats[img.format or "?"] = formats.get(img.format or "?", 0) + 1
                enc_w.append(img.width)
                enc_h.append(img.height)
            except Exception:  # an unreadable image is what the pipeline reports; here it is just counted
                formats["unreadable"] = formats.get("unreadable", 0) + 1

    def stats(v: list[int]) -> dict[str, float] | None:
        return {"min": int(min(v)), "max": int(max(v)), "mean": round(float(np.mean(v)), 1)} if v else None

    n_dup, dup_where = duplicate_ids(found.shards)

    return {
        "path": path,
        "schema": [f"{f.name}: {f.type}" for f in schema],
        "metadata_file": meta is not None,
        "schema_version": meta.get("schema_version") if meta else None,
        "num_rows": found.num_rows,
        "num_shards": len(found.shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "class_names": class_names,
        "counts": {_label_name(k, class_names): v for k, v in sorted(counts.items())},
        "images": {
            "raw": len(raw_h), "raw_height": stats(raw_h), "raw_width": stats(raw_w),
            "encoded_sampled": len(enc_h), "encoded_formats": formats,
            "encoded_height": stats(enc_h), "encoded_width": stats(enc_w),
        },
        "skipped_at_conversion": len(meta.get("skipped", [])) if meta else None,
        "duplicate_ids": {"count": n_dup, "examples": {k: [[s, r] for s, r in v] for k, v in dup_where.items()},
                          "text": describe_duplicates(n_dup, dup_where) if n_dup else ""},
        "shards": shards,
    }


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"dataset {s['path']}", f"  rows: {s['num_rows']}   shards: {s['num_shards']}   "
             f"size: {s['total_bytes'] / 2**20:.2f} MiB   metadata: "
             f"{'schema v' + str(s['schema_version']) if s['metadata_file'] else 'none (_simsiam.json missing)'}",
             "  schema: " + ", ".join(s["schema"]), "  rows per class:"]
    lines += [f"    {name:<20} {n}" for name, n in s["counts"].items()]
    im = s["images"]
    if im["raw"]:
        lines.append(f"  raw images: {im['raw']}, height {im['raw_height']}, width {im['raw_width']}")
    if im["encoded_sampled"] or im["encoded_formats"]:
        lines.append(f"  encoded images (sample of {im['encoded_sampled']}): formats {im['encoded_formats']}, "
                     f"height {im['encoded_height']}, width {im['encoded_width']}")
    if s["skipped_at_conversion"]:
        lines.append(f"  skipped as bad at conversion: {s['skipped_at_conversion']}")
    if s["duplicate_ids"]["count"]:
        lines.append(f"  PROBLEM: {s['duplicate_ids']['text']} (the schema requires unique ids)")
    lines.append("  shards:")
    lines += [f"    {sh['file']}  rows={sh['rows']}  row_groups={sh['row_groups']}  {sh['bytes'] / 2**20:.2f} MiB"
              for sh in s["shards"][:50]]
    if len(s["shards"]) > 50:
        lines.append(f"    ... and {len(s['shards']) - 50} more")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- every row


@dataclass
class BadRow:
    """One row whose image training would reject."""

    shard: str
    row: int       # index of the row in its shard
    id: str
    reason: str

    def __str__(self) -> str:
        return f"{self.shard}: row {self.row} id={self.id!r}: {self.reason}"


@dataclass
class RowCheck:
    """What decoding every row of a dataset found."""

    rows: int = 0
    bad: list[BadRow] = field(default_factory=list)
    bad_count: int = 0          # all bad rows; ``bad`` keeps the first MAX_LISTED of them
    seconds: float = 0.0

    MAX_LISTED = 10_000

    @property
    def clean(self) -> bool:
        return self.bad_count == 0

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "bad_count": self.bad_count, "seconds": round(self.seconds, 2),
                "bad": [{"shard": b.shard, "row": b.row, "id": b.id, "reason": b.reason} for b in self.bad]}


def _check_shard(shard: str, max_pixels: int, batch_rows: int = 64) -> tuple[int, list[BadRow], int]:
    """Decode every row of one shard, a batch at a time (memory: one row group's pages plus one
    batch). Returns (rows, bad rows (at most MAX_LISTED), bad count)."""
    pf = _open(shard)
    cols = [c for c in ("image", "id", "height", "width", "channels") if c in pf.schema_arrow.names]
    n = count = 0
    bad: list[BadRow] = []
    for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
        data = {c: batch.column(c).to_pylist() for c in cols}
        none = [None] * batch.num_rows
        for i, image in enumerate(data["image"]):
            try:
                decode(image, data.get("height", none)[i], data.get("width", none)[i], data.get("channels", none)[i],
                       max_pixels)
            except BadImage as e:
                count += 1
                if len(bad) < RowCheck.MAX_LISTED:
                    bad.append(BadRow(shard, n + i, str(data["id"][i]), str(e)))
        n += batch.num_rows
    return n, bad, count


def check_rows(path: str, max_pixels: int = DataConfig().max_pixels, workers: int | None = None,
               progress: Callable[[int, int, int, int], None] | None = None) -> RowCheck:
    """Decode every row of the dataset at ``path`` exactly as the training pipeline does (same decoder,
    same ``max_pixels``), streaming shard by shard in up to ``workers`` processes (default: one per
    core). ``progress(shards done, shards, rows done, bad so far)`` is called after each shard."""
    t0 = time.monotonic()
    found = validate_shards(path, "PATH")
    out = RowCheck()
    n_workers = min(workers or os.cpu_count() or 1, len(found.shards))

    def take(result: tuple[int, list[BadRow], int], done: int) -> None:
        rows, bad, count = result
        out.rows += rows
        out.bad_count += count
        out.bad += bad[: RowCheck.MAX_LISTED - len(out.bad)]
        if progress:
            progress(done, len(found.shards), out.rows, out.bad_count)

    if n_workers > 1:
        import multiprocessing

        # spawn, not fork: the caller may be a threaded process.
        with ProcessPoolExecutor(max_workers=n_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_check_shard, shard, max_pixels) for shard in found.shards]
            for k, fut in enumerate(futures, 1):
                take(fut.result(), k)
    else:
        for k, shard in enumerate(found.shards, 1):
            take(_check_shard(shard, max_pixels), k)
    out.seconds = time.monotonic() - t0
    return out


def stderr_progress(every_s: float = 5.0) -> Callable[[int, int, int, int], None]:
    """A :func:`check_rows` progress callback printing a line to stderr at most every ``every_s``."""
    state = {"last": 0.0}

    def report(done: int, total: int, rows: int, bad: int) -> None:
        now = time.monotonic()
        if done < total and now - state["last"] < every_s:
            return
        state["last"] = now
        print(f"  decoded {done}/{total} shards, {rows} rows, {bad} bad", file=sys.stderr, flush=True)

    return report


def format_row_check(check: RowCheck, max_lines: int = 50) -> str:
    """The console report of :func:`check_rows`: a verdict, then each bad row by shard and row."""
    if check.clean:
        return f"  every row decodes: {check.rows} rows checked in {check.seconds:.1f} s"
    lines = [f"  PROBLEM: {check.bad_count} of {check.rows} rows cannot be decoded (training stops at the first "
             "unless data.on_bad_image=skip):"]
    lines += [f"    {b}" for b in check.bad[:max_lines]]
    if check.bad_count > max_lines:
        lines.append(f"    ... and {check.bad_count - max_lines} more (--json lists up to {RowCheck.MAX_LISTED})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- sample grids


def sample_rows(path: str, n: int, seed: int = 0, max_pixels: int = DataConfig().max_pixels
                ) -> list[tuple[Image.Image, int, str]]:
    """Up to n random rows as (RGB image, label, id), from random shards; bad images are left out."""
    found = validate_shards(path, "PATH")
    rng = np.random.default_rng(seed)
    out: list[tuple[Image.Image, int, str]] = []
    for k in rng.permutation(len(found.shards)):
        pf = _open(found.shards[k])
        rg = int(rng.integers(pf.metadata.num_row_groups))
        t = pf.read_row_group(rg, columns=found.columns)
        names = set(t.column_names)
        for i in rng.permutation(t.num_rows)[: n - len(out)]:
            row = {c: t.column(c)[int(i)].as_py() for c in names}
            try:
                img = decode(row["image"], row.get("height"), row.get("width"), row.get("channels"), max_pixels)
            except BadImage:
                continue
            out.append((img, int(row["label"]), row["id"]))
        if len(out) >= n:
            break
    return out


def _grid(tiles: list[np.ndarray], captions: list[str], cols: int) -> Image.Image:
    """HWC uint8 tiles (all one size) -> one image with a caption strip under each tile."""
    h, w = tiles[0].shape[:2]
    scale = max(1, math.ceil(_MIN_TILE / min(h, w)))
    th, tw, cap, pad = h * scale, w * scale, 12, 4
    rows = math.ceil(len(tiles) / cols)
    canvas = Image.new("RGB", (cols * (tw + pad) + pad, rows * (th + cap + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, (tile, text) in enumerate(zip(tiles, captions, strict=True)):
        x, y = pad + (k % cols) * (tw + pad), pad + (k // cols) * (th + cap + pad)
        canvas.paste(Image.fromarray(tile).resize((tw, th), Image.NEAREST), (x, y))
        draw.text((x, y + th), text[: max(4, tw // 6)], fill=(0, 0, 0))
    return canvas


def _save_png(img: Image.Image, out: str) -> None:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())


def save_sample_grid(path: str, out_png: str, n: int = 64, seed: int = 0, tile: int = 64) -> int:
    """A grid of n random images (resized to ``tile`` px squares) labelled with their class; returns count."""
    rows = sample_rows(path, n, seed)
    if not rows:
        raise DataError(f"PATH {path}: no decodable images to show")
    meta_names = summarize_class_names(path)
    # Enlarging tiny images (8 px digits) smoothly only blurs them; show their pixels instead.
    tiles = [np.asarray(img.resize((tile, tile), Image.NEAREST if min(img.size) < tile else Image.BILINEAR))
             for img, _, _ in rows]
    _save_png(_grid(tiles, [_label_name(lab, meta_names) for _, lab, _ in rows], cols=8), out_png)
    return len(rows)


def summarize_class_names(path: str) -> list[str]:
    try:
        return list(read_metadata(path).get("class_names", []))
    except DataError:
        return []


def save_pair_grid(path: str, out_png: str, data_cfg: DataConfig, n: int = 16, seed: int = 0) -> int:
    """Two fully augmented views (geometric + photometric, before normalisation) of n images, side by
    side: what the network is trained to match. Returns the number of pairs drawn."""
    import torch

    from simsiam.augment import GeometricAugment, PhotometricAugment

    rows = sample_rows(path, n, seed, data_cfg.max_pixels)
    if not rows:
        raise DataError(f"PATH {path}: no decodable images to show")
    geo = GeometricAugment(data_cfg.image_size, data_cfg.crop_min_scale)
    photo = PhotometricAugment(data_cfg)
    rng = np.random.default_rng(seed)
    v1 = torch.from_numpy(np.stack([geo(img, rng) for img, _, _ in rows]))
    v2 = torch.from_numpy(np.stack([geo(img, rng) for img, _, _ in rows]))
    gen = torch.Generator().manual_seed(seed)
    views = []
    for v in (v1, v2):
        x = photo.apply(v, photo.sample_params(len(v), "cpu", gen), normalize=False)
        views.append((x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    tiles, captions = [], []
    names = summarize_class_names(path)
    for i, (_, label, _) in enumerate(rows):
        tiles += [views[0][i], views[1][i]]
        captions += [_label_name(label, names) + " v1", "v2"]
    _save_png(_grid(tiles, captions, cols=8), out_png)
    return len(rows)
