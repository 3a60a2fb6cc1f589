"""Decoding on the train worker's device (``data.decode: gpu``), checked on CPU, where torchvision's
decode_jpeg runs too: the same crop boxes and flips as the CPU path for the same seed, the same views
within one level, the mode's choice and refusals, and a real Ray Data -> worker pass."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from simsiam import config as C
from simsiam.augment import GeometricAugment
from simsiam.config import ConfigError, DataConfig
from simsiam.data import batches
from simsiam.data.decode import Rows
from simsiam.data.device_decode import decode_views, resolve
from simsiam.data.pipeline import iter_train_batches, train_dataset
from simsiam.data.schema import SCHEMA, DataError

# Largest difference between a device-decoded view and the CPU path's (PIL) view, in uint8 levels,
# and the mean difference: PIL resamples in fixed point, the device path in float32 (measured on
# 500x375-like JPEGs: max 1, mean 0.025 at 224 px; mean < 0.001 at 32 and 64 px).
MAX_LEVELS = 1
MEAN_LEVELS = 0.05


def encode(arr: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def photo(rng: np.random.Generator, h: int, w: int, gray: bool = False) -> np.ndarray:
    """Smooth colour fields plus noise: compresses and resamples like a photo, not like white noise."""
    low = rng.integers(0, 256, (4, 4, 1 if gray else 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(low[..., 0] if gray else low).resize((w, h), Image.BICUBIC)).astype(np.int16)
    img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    return img


def jpeg_rows(n: int, seed: int = 0) -> list[dict]:
    """Photo-sized JPEGs, plus a grayscale one and two smaller than the crop (upsampling, and a
    strip too thin for RandomResizedCrop's tries, which takes its centre-crop fallback)."""
    rng = np.random.default_rng(seed)
    rows = [{"image": encode(photo(rng, int(rng.integers(180, 380)), int(rng.integers(180, 500)))),
             "label": i % 3, "id": f"r{i}"} for i in range(n)]
    rows.append({"image": encode(photo(rng, 120, 160, gray=True)), "label": 0, "id": "gray"})
    rows.append({"image": encode(photo(rng, 24, 40)), "label": 0, "id": "small"})
    rows.append({"image": encode(photo(rng, 12, 300)), "label": 0, "id": "strip"})
    return rows


def table(rows: list[dict], path: str = "/data/part-00000.parquet") -> pa.Table:
    t = pa.Table.from_pylist(rows, schema=SCHEMA)
    return t.append_column("path", pa.array([path] * t.num_rows, pa.string()))


def write_shard(path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)


@pytest.mark.parametrize("size", [32, 64])
def test_device_views_have_the_cpu_paths_boxes_and_pixels(size):
    t = table(jpeg_rows(10))
    seed, scale = 5, 0.2
    cpu = batches.train_batch(t, size, scale, 1 << 40, "error", seed)
    enc = batches.train_batch_encoded(t, size, scale, 1 << 40, "error", seed)
    # The CPU path's boxes: replaying its generator reproduces its views exactly, so these are the
    # boxes it used; the encoded batch must carry the very same ones.
    rows, geo = Rows(t), GeometricAugment(size, scale)
    rng = batches._batch_rng(seed, rows)
    for i in range(rows.n):
        img = rows.decode(i, 1 << 40)
        for v in range(2):
            top, left, h, w, flip = geo.draw(img.height, img.width, rng)
            view = np.asarray(img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h)))
            view = (view[:, ::-1] if flip else view).transpose(2, 0, 1)
            np.testing.assert_array_equal(view, cpu[f"view{v + 1}"][i])
            assert tuple(enc["crop"][i, v]) == (top, left, h, w) and bool(enc["flip"][i, v]) == flip
    assert enc["flip"].any() and not enc["flip"].all()
    v1, v2, n_bad = decode_views(enc, size, "cpu")
    assert n_bad == 0 and v1.dtype == torch.uint8 and v1.shape == (rows.n, 3, size, size)
    diff = np.abs(np.stack([v1.numpy(), v2.numpy()]).astype(int) - np.stack([cpu["view1"], cpu["view2"]]).astype(int))
    assert diff.max() <= MAX_LEVELS and diff.mean() <= MEAN_LEVELS, (diff.max(), diff.mean())


def test_gpu_mode_refuses_images_that_are_not_jpeg_naming_the_row():
    rng = np.random.default_rng(1)
    rows = jpeg_rows(2) + [{"image": encode(photo(rng, 40, 40), "PNG"), "label": 0, "id": "png"}]
    with pytest.raises(DataError, match=r"part-00000.parquet: row id='png': PNG image, but data.decode=gpu "
                                        r"decodes only JPEG .*data.decode=cpu"):
        batches.train_batch_encoded(table(rows), 32, 0.2, 1 << 40, "error", 0)


def test_bad_jpegs_named_or_skipped_at_decode():
    rows = jpeg_rows(3)
    good = rows[0]["image"]
    rows.insert(1, {"image": good[: len(good) // 2], "label": 0, "id": "truncated"})  # the header is intact
    rows.insert(2, {"image": b"garbage", "label": 0, "id": "garbage"})  # caught from the header, in the task
    with pytest.raises(DataError, match=r"row id='garbage': corrupt or not an image"):
        batches.train_batch_encoded(table(rows), 32, 0.2, 1 << 40, "error", 0)
    enc = batches.train_batch_encoded(table(rows), 32, 0.2, 1 << 40, "skip", 0)
    assert enc["valid"].tolist().count(False) == 1
    with pytest.raises(DataError, match=r"part-00000.parquet: row id='truncated': corrupt or truncated JPEG "
                                        r"\(decode on cpu failed"):
        decode_views(enc, 32, "cpu")
    v1, v2, n_bad = decode_views(enc, 32, "cpu", on_bad_image="skip")
    assert n_bad == 2 and len(v1) == len(v2) == len(rows) - 2


def test_decode_mode_resolution(tmp_path):
    rng = np.random.default_rng(2)
    jpeg, png = tmp_path / "jpeg", tmp_path / "png"
    jpeg.mkdir()
    png.mkdir()
    write_shard(jpeg / "part-00000.parquet", jpeg_rows(2))
    write_shard(png / "part-00000.parquet", [{"image": encode(photo(rng, 16, 16), "PNG"), "label": 0, "id": "p0"}])
    auto, gpu, cpu = (DataConfig(decode=m) for m in ("auto", "gpu", "cpu"))
    assert resolve(auto, str(jpeg), use_gpu=True) == "gpu"
    assert resolve(auto, str(jpeg), use_gpu=False) == "cpu"
    assert resolve(auto, str(png), use_gpu=True) == "cpu"
    assert resolve(cpu, str(jpeg), use_gpu=True) == "cpu"
    assert resolve(gpu, str(jpeg), use_gpu=False) == "gpu"  # decoded in the worker, on its CPU
    with pytest.raises(DataError, match=r"data.decode=gpu: .*png/part-00000.parquet: row id='p0' holds a PNG "
                                        r"image, but GPU decode reads only JPEG; use data.decode=cpu"):
        resolve(gpu, str(png), use_gpu=True)
    raw = tmp_path / "raw"
    raw.mkdir()
    write_shard(raw / "part-00000.parquet", [])  # an empty first shard is passed over
    write_shard(raw / "part-00001.parquet", [{"image": bytes(48), "label": 0, "id": "r0", "height": 4, "width": 4,
                                              "channels": 3}])
    assert resolve(auto, str(raw), use_gpu=True) == "cpu"
    with pytest.raises(DataError, match=r"part-00001.parquet: row id='r0' holds raw pixels, but GPU decode"):
        resolve(gpu, str(raw), use_gpu=True)


def test_decode_config_field():
    assert C.load("sample").data.decode == "cpu"
    assert C.load("sample", {"data.decode": "gpu"}).data.decode == "gpu"
    with pytest.raises(ConfigError, match=r"data.decode: 'nvjpeg' is not allowed; choose one of auto, cpu, gpu"):
        C.load("sample", {"data.decode": "nvjpeg"})
    help_text = {name: h for name, _, h in C.describe()}["data.decode"]
    assert "decode_jpeg" in help_text and "[auto|cpu|gpu]" in help_text


@pytest.mark.slow
def test_ray_data_to_worker_in_gpu_mode_matches_the_cpu_path(ray_local, tmp_path):
    """Real Ray Data over a real shard, decoded by the consumer on CPU (the device fallback): the same
    batches as the CPU path, within the stated levels."""
    write_shard(tmp_path / "part-00000.parquet", jpeg_rows(21))
    cfg = DataConfig(image_size=32, shuffle_buffer=0, decode="gpu")
    got = {}
    for mode in ("cpu", "gpu"):
        ds = train_dataset(cfg, str(tmp_path), 3, mode)
        # Training streams blocks in completion order; compared batch by batch, they must come in order.
        ds.context.execution_options.preserve_order = True
        got[mode] = [(v1.clone(), v2.clone(), n) for v1, v2, n in iter_train_batches(
            ds, cfg, 8, 3, 0, "cpu", decode=mode)]
    assert len(got["gpu"]) == len(got["cpu"]) == 3
    for (a1, a2, na), (b1, b2, nb) in zip(got["cpu"], got["gpu"], strict=True):
        assert na == nb == 0 and a1.shape == b1.shape == (8, 3, 32, 32) and b1.dtype == torch.uint8
        diff = (torch.stack([a1, a2]).int() - torch.stack([b1, b2]).int()).abs()
        assert int(diff.max()) <= MAX_LEVELS and float(diff.float().mean()) <= MEAN_LEVELS


@pytest.mark.slow
def test_gpu_e2e_benchmark_quick_dry_run_on_cpu(ray_local, tmp_path):
    """The benchmark's whole script on CPU with tiny sizes: its JSON, including a real Ray Train run
    fed in decode=gpu mode (the worker decodes the JPEGs on its CPU)."""
    from benchmarks import gpu_e2e

    out = tmp_path / "gpu_e2e.json"
    assert gpu_e2e.main(["--out", str(out), "--quick", "--levers", "sgd_fused,compile,cudnn_benchmark_off"]) == 0
    res = json.loads(out.read_text())
    for k in ("name", "metric", "ours", "baseline", "ratio", "target", "config"):
        assert k in res
    assert res["name"] == "gpu_e2e" and res["device"] == "cpu" and "not GPU figures" in res["note"]
    assert res["target"] == 0.9 and res["config"]["quick"] is True
    recipes = res["recipes"]
    assert set(recipes) == {"cifar10_resnet18_32", "imagenet_resnet50_224"}
    for r in recipes.values():
        assert r["baseline"] > 0 and r["ours"] > 0 and r["ratio"] == pytest.approx(r["ours"] / r["baseline"], rel=0.02)
        assert all(e["status"] == "finished" for e in r["end_to_end"].values())
    # PNG data: the CPU path only; JPEG data: both, the device-decode run included.
    assert set(recipes["cifar10_resnet18_32"]["end_to_end"]) == {"decode_cpu_prefetch_2"}
    e2e = recipes["imagenet_resnet50_224"]["end_to_end"]
    assert set(e2e) == {"decode_cpu_prefetch_2", "decode_gpu_prefetch_2"}
    assert e2e["decode_gpu_prefetch_2"]["decode"] == "gpu"
    levers = recipes["imagenet_resnet50_224"]["levers"]
    assert levers["measured"] == ["sgd_fused"] and levers["results"]["sgd_fused"]["pairs_per_s"] > 0
    assert set(levers["not_measured"]) == {"compile", "cudnn_benchmark_off"}
