"""Look inside a shard dataset: schema, counts per class, shards and sizes, and PNG grids of samples
and of augmented view pairs. Reads with pyarrow directly (no Ray), so it is quick on any machine."""
from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from simsiam.config import DataConfig
from simsiam.data.decode import BadImage, decode
from simsiam.data.schema import DataError, filesystem, read_metadata, validate_shards
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
    lines.append("  shards:")
    lines += [f"    {sh['file']}  rows={sh['rows']}  row_groups={sh['row_groups']}  {sh['bytes'] / 2**20:.2f} MiB"
              for sh in s["shards"][:50]]
    if len(s["shards"]) > 50:
        lines.append(f"    ... and {len(s['shards']) - 50} more")
    return "\n".join(lines)


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
