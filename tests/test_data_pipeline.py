"""The Ray Data pipelines on a real local Ray: every source round-trips exactly through convert ->
shards -> Ray Data -> torch batches; train views; the bad-data cases, as errors or counted skips."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from simsiam.augment import PhotometricAugment
from simsiam.config import DataConfig
from simsiam.data import resolve_paths
from simsiam.data.convert import convert, digits_split
from simsiam.data.pipeline import (
    dataset_info,
    eval_dataset,
    ingest_options,
    iter_eval_batches,
    iter_train_batches,
    labeled_train_dataset,
    train_dataset,
)
from simsiam.data.schema import SCHEMA, DataError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]




def key(img_chw: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(img_chw).tobytes()).hexdigest()


def eval_multiset(cfg: DataConfig, path: str) -> list[tuple[int, str]]:
    out = []
    for images, labels in iter_eval_batches(eval_dataset(cfg, path), 64):
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        out += [(int(y), key(x.numpy())) for x, y in zip(images, labels, strict=True)]
    return sorted(out)


def expected_multiset(images_hwc: list[np.ndarray], labels) -> list[tuple[int, str]]:
    return sorted((int(y), key(np.asarray(x).transpose(2, 0, 1))) for x, y in zip(images_hwc, labels, strict=True))


# --------------------------------------------------------------------------- round trips


def test_round_trip_npz(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (70, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 70)
    np.savez(tmp_path / "c.npz", images=x, labels=y)
    convert(tmp_path / "c.npz", tmp_path / "ds", shard_rows=16)
    cfg = DataConfig(image_size=32, eval_resize=1.0)
    assert eval_multiset(cfg, str(tmp_path / "ds")) == expected_multiset(list(x), y)


def test_round_trip_image_folder(tmp_path):
    rng = np.random.default_rng(1)
    images, labels = [], []
    for c in range(3):
        (tmp_path / "src" / f"class{c}").mkdir(parents=True)
        for i in range(5):
            arr = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "src" / f"class{c}" / f"{i}.png")
            images.append(arr)
            labels.append(c)
    convert(tmp_path / "src", tmp_path / "ds", shard_rows=4)
    cfg = DataConfig(image_size=24, eval_resize=1.0)
    assert eval_multiset(cfg, str(tmp_path / "ds")) == expected_multiset(images, labels)


def test_round_trip_builtin_digits_and_train_views(tmp_path):
    cfg = DataConfig(path="builtin:digits", cache_dir=str(tmp_path), image_size=8, eval_resize=1.0,
                     crop_min_scale=1.0, shuffle_buffer=256)
    train, test = resolve_paths(cfg)
    split = digits_split()
    gray3 = [np.repeat(im[..., None], 3, -1) for im in split["test"][0]]
    assert eval_multiset(cfg, test) == expected_multiset(gray3, split["test"][1])
    info = dataset_info(train)
    assert info["num_rows"] == 1437 and info["num_classes"] == 10 and info["labeled"]

    # Train views: with min_scale 1 on square 8 px images a view is the image or its mirror.
    originals = {key(np.repeat(im[None], 3, 0)) for im in split["train"][0]}
    originals |= {key(np.repeat(im[None, :, ::-1], 3, 0)) for im in split["train"][0]}
    ds = train_dataset(cfg, train, seed=0)
    seen = 0
    flipped_differ = 0
    for v1, v2, skipped in iter_train_batches(ds, cfg, batch_size=100, seed=0, epoch=0, device="cpu"):
        assert v1.shape == (100, 3, 8, 8) and v1.dtype == torch.uint8 and skipped == 0
        for a, b in zip(v1.numpy(), v2.numpy(), strict=True):
            assert key(a) in originals and key(b) in originals
            flipped_differ += not np.array_equal(a, b)
        seen += len(v1)
    assert seen == 1400  # 1437 rows, drop_last
    assert flipped_differ > 300  # views flip independently
    # Photometric half on the consumer's device finishes a training-ready pair.
    out = PhotometricAugment(cfg)(v1)
    assert out.shape == v1.shape and out.dtype == torch.float32


def test_train_views_change_per_epoch_and_full_pass(tmp_path):
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "a.npz", images=rng.integers(0, 256, (64, 40, 40, 3), dtype=np.uint8))
    convert(tmp_path / "a.npz", tmp_path / "ds", shard_rows=16)
    cfg = DataConfig(image_size=16, shuffle_buffer=0, data_cpus=1.5)
    ds = train_dataset(cfg, str(tmp_path / "ds"), seed=3)
    assert ds.context.execution_options.resource_limits.cpu == 1.5
    assert ingest_options(cfg).resource_limits.cpu == 1.5
    epochs = []
    for epoch in range(2):
        views = set()
        for v1, v2, _ in iter_train_batches(ds, cfg, batch_size=16, seed=3, epoch=epoch):
            views |= {key(v) for v in v1.numpy()} | {key(v) for v in v2.numpy()}
        epochs.append(views)
    assert len(epochs[0]) == 128 and not epochs[0] & epochs[1]  # fresh crops each epoch


def test_labeled_train_dataset(tmp_path):
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "a.npz", images=rng.integers(0, 256, (40, 20, 20, 3), dtype=np.uint8),
             labels=np.arange(40) % 4)
    convert(tmp_path / "a.npz", tmp_path / "ds")
    cfg = DataConfig(image_size=12)
    labels = []
    for images, y in iter_eval_batches(labeled_train_dataset(cfg, str(tmp_path / "ds"), seed=0), 16):
        assert images.shape[1:] == (3, 12, 12)
        labels += y.tolist()
    assert sorted(labels) == sorted((np.arange(40) % 4).tolist())


# --------------------------------------------------------------------------- bad data


def write_shard(path, rows: list[dict]) -> None:
    cols = {name: [r.get(name) for r in rows] for name in SCHEMA.names}
    pq.write_table(pa.Table.from_pydict(cols, schema=SCHEMA), path)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory) -> str:
    """Two shards: good rows plus one of each kind of bad image, and one unlabeled row."""
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    good = [{"image": png_bytes(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)), "label": i % 2,
             "id": f"good{i}"} for i in range(10)]
    jpeg = jpeg_bytes(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    bomb = png_bytes(np.zeros((1200, 1200, 3), np.uint8))  # tiny file, 1.44 M pixels
    write_shard(d / "part-00000.parquet", good[:5] + [{"image": b"garbage", "label": 0, "id": "corrupt"}])
    write_shard(d / "part-00001.parquet", good[5:] + [
        {"image": jpeg[: len(jpeg) // 2], "label": 1, "id": "truncated"},
        {"image": bomb, "label": 1, "id": "bomb"},
        {"image": b"\x00" * 10, "label": 0, "id": "rawshort", "height": 4, "width": 4, "channels": 3},
    ])
    return str(d)


def test_bad_images_raise_naming_shard_and_row(bad_dataset, tmp_path):
    cfg = DataConfig(image_size=16, max_pixels=1_000_000, shuffle_buffer=0)
    with pytest.raises(DataError) as err:
        for _ in iter_train_batches(train_dataset(cfg, bad_dataset, 0), cfg, 4, 0, 0):
            pass
    msg = str(err.value)
    # One clear line naming the shard and the row, not Ray's wrapper with a remote traceback.
    assert msg.startswith(bad_dataset) and "part-0000" in msg and "row id=" in msg and "\n" not in msg
    assert any(k in msg for k in ("'corrupt'", "'truncated'", "'bomb'", "'rawshort'"))
    # Each kind alone, to check every message.
    for bad_id, needle in (("corrupt", "corrupt or not an image"), ("truncated", "truncated"),
                           ("bomb", "over data.max_pixels = 1000000"), ("rawshort", "raw image has 10 bytes")):
        d = tmp_path / bad_id
        d.mkdir()
        rows = pq.read_table(f"{bad_dataset}/part-0000{0 if bad_id == 'corrupt' else 1}.parquet").to_pylist()
        write_shard(d / "part-00000.parquet", [r for r in rows if r["id"] == bad_id or r["id"].startswith("good")])
        with pytest.raises(DataError, match=rf"part-00000.parquet: row id='{bad_id}': .*{needle}"):
            for _ in iter_eval_batches(eval_dataset(cfg, str(d)), 8):
                pass


def test_bad_images_skipped_and_counted(bad_dataset):
    cfg = DataConfig(image_size=16, max_pixels=1_000_000, on_bad_image="skip", shuffle_buffer=0)
    good = skipped = 0
    for v1, v2, n_bad in iter_train_batches(train_dataset(cfg, bad_dataset, 0), cfg, 1, 0, 0):
        good += len(v1)
        skipped += n_bad
        assert len(v1) == len(v2)
    assert (good, skipped) == (10, 4)
    stats: dict = {}
    n = sum(len(y) for _, y in iter_eval_batches(eval_dataset(cfg, bad_dataset), 4, stats=stats))
    assert n == 10 and stats["skipped"] == 4


def test_missing_label_where_required(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"image": png_bytes(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)), "label": 1, "id": f"r{i}"}
            for i in range(3)]
    rows[1]["label"] = -1
    write_shard(tmp_path / "part-00000.parquet", rows)
    cfg = DataConfig(image_size=8)
    with pytest.raises(DataError, match=r"part-00000.parquet: row id='r1': label is missing"):
        list(iter_eval_batches(eval_dataset(cfg, str(tmp_path)), 4))
    assert not dataset_info(str(tmp_path))["labeled"]
    # Wholly unlabeled converted data is refused up front, before any task runs.
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(flat / "a.png")
    convert(flat, tmp_path / "flat-ds")
    with pytest.raises(DataError, match="has no labels"):
        eval_dataset(cfg, str(tmp_path / "flat-ds"))
    # Training needs no labels.
    assert sum(len(v) for v, _, _ in iter_train_batches(train_dataset(cfg, str(tmp_path / "flat-ds"), 0), cfg, 1,
                                                          0, 0)) == 1


def test_wrong_schema_empty_and_missing_paths(tmp_path):
    cfg = DataConfig(image_size=8)
    pq.write_table(pa.table({"image": [b"x"], "label": ["a"], "id": ["0"]}), tmp_path / "part-00000.parquet")
    with pytest.raises(DataError, match="part-00000.parquet: wrong schema: column 'label' is string"):
        train_dataset(cfg, str(tmp_path), 0)
    with pytest.raises(DataError, match="data.path is empty"):
        train_dataset(cfg, "", 0)
    with pytest.raises(DataError, match="does not exist"):
        eval_dataset(cfg, str(tmp_path / "missing"))
    (tmp_path / "e").mkdir()
    write_shard(tmp_path / "e" / "part-00000.parquet", [])
    with pytest.raises(DataError, match="has 0 rows"):
        train_dataset(cfg, str(tmp_path / "e"), 0)
