"""Conversion to shards (no Ray): each source round-trips exactly; atomic writes, overwrite and resume
rules; bad source images; the CLI; resolve_paths and the built-in digits cache."""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from simsiam.config import ConfigError, DataConfig
from simsiam.data import builtin_dir, resolve_paths
from simsiam.data.cli import main as data_main
from simsiam.data.convert import convert, digits_split
from simsiam.data.decode import decode
from simsiam.data.schema import METADATA_FILE, PLAN_FILE, DataError, read_metadata, validate_shards

ROOT = Path(__file__).resolve().parent.parent


def read_rows(path: str | Path) -> dict[str, dict]:
    """id -> row (image bytes, decoded pixels, label) over every shard of a dataset."""
    out = {}
    for shard in validate_shards(str(path)).shards:
        for r in pq.read_table(shard).to_pylist():
            assert r["id"] not in out, f"duplicate id {r['id']}"
            r["pixels"] = np.asarray(decode(r["image"], r["height"], r["width"], r["channels"], 10**9))
            out[r["id"]] = r
    return out


def rand_images(n: int, size: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (n, size, size, channels) if channels > 1 else (n, size, size)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def make_folder(root: Path, classes: dict[str, int], size: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """A class-per-folder tree with PNG, JPEG and BMP files; returns relative path -> pixels."""
    rng = np.random.default_rng(seed)
    out = {}
    for c, n in classes.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, (size, size + i % 3, 3), dtype=np.uint8)
            ext = ("png", "jpg", "bmp")[i % 3]
            rel = f"{c}/img{i:03d}.{ext}"
            Image.fromarray(arr).save(root / rel)
            out[rel] = arr
    return out


# --------------------------------------------------------------------------- round trips per source


def test_image_folder_round_trip(tmp_path):
    src = tmp_path / "src"
    pixels = make_folder(src, {"cat": 7, "dog": 5})
    (src / "cat" / "notes.txt").write_text("ignored")
    [report] = convert(src, tmp_path / "out", shard_rows=4)
    assert report.num_rows == 12 and report.num_shards == 3 and report.counts == {"0": 7, "1": 5}
    rows = read_rows(tmp_path / "out")
    assert set(rows) == set(pixels)
    for rel, row in rows.items():
        assert row["label"] == ["cat", "dog"].index(rel.split("/")[0])
        if rel.endswith((".png", ".jpg")):
            assert row["image"] == (src / rel).read_bytes()  # original bytes kept
        else:
            assert row["image"][:8] == b"\x89PNG\r\n\x1a\n"  # BMP transcoded, losslessly
        if not rel.endswith(".jpg"):
            assert np.array_equal(row["pixels"], pixels[rel])
        assert row["height"] is None
    meta = read_metadata(str(tmp_path / "out"))
    assert meta["class_names"] == ["cat", "dog"] and meta["num_rows"] == 12 and meta["schema_version"] == 1
    assert [s["rows"] for s in meta["shards"]] == [4, 4, 4] and meta["counts"] == {"0": 7, "1": 5}
    assert not (tmp_path / "out" / PLAN_FILE).exists()


def test_flat_folder_is_unlabeled(tmp_path):
    for i in range(3):
        Image.fromarray(rand_images(1, 9, i)[0]).save(tmp_path / f"{i}.png")
    [report] = convert(tmp_path, tmp_path.parent / f"{tmp_path.name}-out")
    rows = read_rows(tmp_path.parent / f"{tmp_path.name}-out")
    assert report.counts == {"-1": 3} and {r["label"] for r in rows.values()} == {-1}
    assert read_metadata(str(tmp_path.parent / f"{tmp_path.name}-out"))["class_names"] == []


def test_npz_with_splits_round_trip_raw(tmp_path):
    xtr, xte = rand_images(50, 32, 0), rand_images(20, 32, 1)
    ytr = np.random.default_rng(0).integers(0, 10, (50, 1))  # Keras-style (N, 1) labels
    yte = np.random.default_rng(1).integers(0, 10, 20)
    np.savez(tmp_path / "c.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    reports = convert(tmp_path / "c.npz", tmp_path / "out", shard_rows=16)
    assert [r.dest for r in reports] == [str(tmp_path / "out" / "train"), str(tmp_path / "out" / "test")]
    for split, x, y in (("train", xtr, ytr[:, 0]), ("test", xte, yte)):
        rows = read_rows(tmp_path / "out" / split)
        assert len(rows) == len(x)
        for i in range(len(x)):
            r = rows[f"{split}/{i:06d}"]
            assert (r["height"], r["width"], r["channels"]) == (32, 32, 3)  # raw storage at 32 px
            assert np.array_equal(r["pixels"], x[i]) and r["label"] == y[i]


def test_npz_large_images_png_and_gray_nchw(tmp_path):
    x = rand_images(6, 80, 0)                   # > 64 px: stored as PNG
    g = rand_images(5, 12, 1, channels=1)       # gray (N, H, W)
    c = rand_images(4, 10, 2).transpose(0, 3, 1, 2)  # NCHW
    np.savez(tmp_path / "a.npz", images=x, labels=np.arange(6))
    np.savez(tmp_path / "g.npz", x=g)
    np.savez(tmp_path / "c.npz", data=c, labels=np.zeros(4, np.int32), class_names=np.array(["only"]))
    convert(tmp_path / "a.npz", tmp_path / "a")
    rows = read_rows(tmp_path / "a")
    assert all(r["height"] is None for r in rows.values())
    assert all(np.array_equal(rows[f"a/{i:06d}"]["pixels"], x[i]) for i in range(6))
    convert(tmp_path / "g.npz", tmp_path / "g")
    rows = read_rows(tmp_path / "g")
    assert all(np.array_equal(rows[f"g/{i:06d}"]["pixels"], np.stack([g[i]] * 3, -1)) for i in range(5))
    assert read_metadata(str(tmp_path / "g"))["counts"] == {"-1": 5}
    convert(tmp_path / "c.npz", tmp_path / "c")
    rows = read_rows(tmp_path / "c")
    assert all(np.array_equal(rows[f"c/{i:06d}"]["pixels"], c[i].transpose(1, 2, 0)) for i in range(4))
    assert read_metadata(str(tmp_path / "c"))["class_names"] == ["only"]


def test_npz_bad_arrays_are_named(tmp_path):
    np.savez(tmp_path / "f.npz", images=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(DataError, match=r"f.npz\[images\].*uint8"):
        convert(tmp_path / "f.npz", tmp_path / "o1")
    np.savez(tmp_path / "m.npz", images=rand_images(3, 8), labels=np.arange(4))
    with pytest.raises(DataError, match=r"labels shaped \(4,\) do not match 3 images"):
        convert(tmp_path / "m.npz", tmp_path / "o2")
    np.savez(tmp_path / "k.npz", foo=rand_images(3, 8))
    with pytest.raises(DataError, match="no image array found; keys are foo"):
        convert(tmp_path / "k.npz", tmp_path / "o3")


def test_builtin_digits_fixed_stratified_split(tmp_path):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    reports = convert(None, tmp_path, builtin="digits")
    assert [r.num_rows for r in reports] == [1437, 360]
    d = load_digits()
    tr, te = train_test_split(np.arange(1797), test_size=0.2, random_state=0, stratify=d.target)
    split = digits_split()
    assert np.array_equal(split["train"][2], tr) and np.array_equal(split["test"][2], te)
    for name, idx in (("train", tr), ("test", te)):
        rows = read_rows(tmp_path / name)
        assert len(rows) == len(idx)
        for k, orig in enumerate(idx):
            r = rows[f"digits/{name}/{k:06d}"]
            expect = np.round(d.images[orig] * 255 / 16).astype(np.uint8)
            assert np.array_equal(r["pixels"][..., 0], expect) and r["label"] == d.target[orig]
            assert (r["height"], r["width"], r["channels"]) == (8, 8, 1)
    counts = read_metadata(str(tmp_path / "train"))["counts"]
    assert sum(counts.values()) == 1437 and min(counts.values()) >= 139  # stratified: ~144 per class


def test_builtin_shapes_is_deterministic_balanced_and_converts(tmp_path, capsys):
    from simsiam.data import shapes

    small = {"train": 40, "test": 20}
    a, b = shapes.shapes_split(0, small), shapes.shapes_split(0, small)
    for split, n in small.items():
        images, labels = a[split]
        assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8
        assert np.array_equal(images, b[split][0]) and np.array_equal(labels, b[split][1])
        k = len(shapes.CLASSES)
        assert np.bincount(labels, minlength=k).tolist() == [n // k] * k
    assert not np.array_equal(a["train"][0][:20], a["test"][0])
    assert not np.array_equal(shapes.shapes_split(1, small)["train"][0], a["train"][0])
    # The test split does not depend on the train split's size.
    assert np.array_equal(shapes.shapes_split(0, {"train": 10, "test": 20})["test"][0], a["test"][0])
    # Colour is a nuisance: the mean colour of a class is about that of the others.
    x, y = shapes.shapes_split(0, {"train": 500, "test": 0})["train"]
    means = np.stack([x[y == c].reshape(-1, 3).mean(0) for c in range(len(shapes.CLASSES))])
    assert np.ptp(means, axis=0).max() < 50  # 0..255 scale; measured 13
    assert data_main(["convert", "--builtin", "shapes", str(tmp_path / "s"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"{shapes.SPLITS['train']} rows" in out and f"{shapes.SPLITS['test']} rows" in out
    meta = read_metadata(str(tmp_path / "s" / "train"))
    assert meta["class_names"] == list(shapes.CLASSES)
    rows = read_rows(tmp_path / "s" / "test")
    first = rows["shapes/test/000000"]
    assert (first["height"], first["width"], first["channels"]) == (32, 32, 3)
    full = shapes.shapes_split(0, {"train": 0, "test": shapes.SPLITS["test"]})["test"]
    assert np.array_equal(first["pixels"], full[0][0]) and first["label"] == full[1][0]


def test_parallel_workers_write_the_same_shards(tmp_path):
    np.savez(tmp_path / "a.npz", images=rand_images(300, 16), labels=np.arange(300) % 7)
    convert(tmp_path / "a.npz", tmp_path / "one", shard_rows=50, workers=1)
    convert(tmp_path / "a.npz", tmp_path / "two", shard_rows=50, workers=2)
    for k in range(6):
        a = pq.read_table(tmp_path / "one" / f"part-{k:05d}.parquet")
        b = pq.read_table(tmp_path / "two" / f"part-{k:05d}.parquet")
        assert a.equals(b)


# --------------------------------------------------------------------------- overwrite / resume / atomic


def test_overwrite_rules(tmp_path):
    np.savez(tmp_path / "a.npz", images=rand_images(10, 8, 0))
    np.savez(tmp_path / "b.npz", images=rand_images(12, 8, 1))
    out = tmp_path / "out"
    convert(tmp_path / "a.npz", out)
    [again] = convert(tmp_path / "a.npz", out)  # same source and options: nothing to do
    assert again.up_to_date and again.num_rows == 10
    with pytest.raises(DataError, match="already holds a converted dataset.*--overwrite"):
        convert(tmp_path / "b.npz", out)
    assert len(read_rows(out)) == 10  # untouched
    [r] = convert(tmp_path / "b.npz", out, overwrite=True)
    assert r.num_rows == 12 and len(read_rows(out)) == 12
    # Never deletes what it did not write, even with --overwrite.
    (out / "mine.txt").write_text("keep")
    with pytest.raises(DataError, match="did not write.*mine.txt"):
        convert(tmp_path / "a.npz", out, overwrite=True)
    assert (out / "mine.txt").read_text() == "keep"
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.csv").write_text("1")
    with pytest.raises(DataError, match="not a simsiam dataset"):
        convert(tmp_path / "a.npz", other)


def test_resume_after_kill_keeps_finished_shards_without_duplicates(tmp_path):
    # 96 px noise -> PNG encoding, slow enough to kill the converter part-way.
    images = rand_images(1200, 96)
    np.savez(tmp_path / "big.npz", images=images, labels=np.arange(1200) % 10)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "simsiam.cli", "data", "convert", str(tmp_path / "big.npz"), str(out),
           "--shard-rows", "20", "--workers", "1", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (out / "part-00002.parquet").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = sorted(p.name for p in out.glob("part-*.parquet"))
    assert not (out / METADATA_FILE).exists(), "finished before it could be interrupted"
    assert (out / PLAN_FILE).exists() and 3 <= len(written) < 60
    for p in out.glob("part-*.parquet"):
        assert pq.ParquetFile(p).metadata.num_rows == 20  # complete shards only: renamed into place
    (out / ".part-00059.parquet.abc.tmp").write_bytes(b"half a shard")  # as a write killed mid-way leaves
    with pytest.raises(DataError, match="unfinished conversion"):
        validate_shards(str(out))  # readers refuse the incomplete dataset
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    [report] = convert(tmp_path / "big.npz", out, shard_rows=20, workers=1)
    assert report.reused_shards == len(written) and report.num_rows == 1200
    assert all((out / n).stat().st_mtime_ns == t for n, t in before.items())  # kept, not rewritten
    assert not list(out.glob("*.tmp")) and not (out / PLAN_FILE).exists()
    rows = read_rows(out)
    assert len(rows) == 1200
    for i in range(0, 1200, 97):
        assert np.array_equal(rows[f"big/{i:06d}"]["pixels"], images[i])
    # A different plan on top of an unfinished one is refused.
    (out / METADATA_FILE).unlink()
    (out / PLAN_FILE).write_text(json.dumps({"other": True}))
    with pytest.raises(DataError, match="unfinished conversion of a different source"):
        convert(tmp_path / "big.npz", out, shard_rows=20)


def test_bad_source_images(tmp_path):
    src = tmp_path / "src"
    make_folder(src, {"a": 3})
    (src / "a" / "broken.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match=r"broken.jpg: not a readable image"):
        convert(src, tmp_path / "out")
    [report] = convert(src, tmp_path / "out2", on_bad_image="skip")
    assert report.num_rows == 3 and len(report.skipped) == 1 and "broken.jpg" in report.skipped[0][0]
    assert "skipped 1 bad image" in report.summary()
    meta = read_metadata(str(tmp_path / "out2"))
    assert len(meta["skipped"]) == 1 and "broken.jpg" in meta["skipped"][0]["item"]


def test_truncated_jpeg_and_pixel_bomb_are_bad_images_not_rows(tmp_path, capsys):
    """A truncated JPEG has a readable header: only a full decode finds it. Stored, it would stop training."""
    src = tmp_path / "src"
    make_folder(src, {"a": 3})
    buf = io.BytesIO()
    Image.fromarray(rand_images(1, 64)[0]).save(buf, format="JPEG")
    (src / "a" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    Image.fromarray(np.zeros((300, 400, 3), np.uint8)).save(src / "a" / "big.png")
    with pytest.raises(DataError, match=r"cut.jpg: not a readable image: truncated"):
        convert(src, tmp_path / "out")
    assert data_main(["convert", str(src), str(tmp_path / "out2"), "--on-bad-image", "skip", "--max-pixels", "100000",
                      "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "3 rows" in out and "skipped 2 bad image(s)" in out
    assert "cut.jpg: not a readable image: truncated" in out
    assert "big.png: not a readable image: image is 400x300 = 120000 pixels, over data.max_pixels = 100000" in out
    ids = {r["id"] for r in pq.read_table(tmp_path / "out2" / "part-00000.parquet").to_pylist()}
    assert ids == {"a/img000.png", "a/img001.jpg", "a/img002.bmp"}
    assert len(read_metadata(str(tmp_path / "out2"))["skipped"]) == 2


def test_source_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        convert(tmp_path / "nope", tmp_path / "o")
    with pytest.raises(DataError, match="SRC is empty"):
        convert("", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        convert(tmp_path / "empty", tmp_path / "o")
    mixed = tmp_path / "mixed"
    make_folder(mixed, {"c": 1})
    Image.fromarray(rand_images(1, 8)[0]).save(mixed / "top.png")
    with pytest.raises(DataError, match="both images at the top level"):
        convert(mixed, tmp_path / "o")


# --------------------------------------------------------------------------- schema checks


def test_wrong_schema_and_missing_paths_are_named(tmp_path):
    good = tmp_path / "ds"
    np.savez(tmp_path / "a.npz", images=rand_images(4, 8))
    convert(tmp_path / "a.npz", good)
    bad = pa.table({"image": [b"x"], "label": ["cat"], "id": ["0"]})
    pq.write_table(bad, good / "part-00099.parquet")
    with pytest.raises(DataError, match=r"part-00099.parquet: wrong schema: column 'label' is string"):
        validate_shards(str(good))
    pq.write_table(pa.table({"pixels": [b"x"]}), good / "part-00099.parquet")
    with pytest.raises(DataError, match=r"part-00099.parquet: wrong schema: missing column\(s\) image, label, id"):
        validate_shards(str(good))
    (good / "part-00099.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(DataError, match="part-00099.parquet: not a readable Parquet file"):
        validate_shards(str(good))
    with pytest.raises(DataError, match="data.path is empty"):
        validate_shards("")
    with pytest.raises(DataError, match="does not exist"):
        validate_shards(str(tmp_path / "missing"))
    (tmp_path / "void").mkdir()
    with pytest.raises(DataError, match="contains no .parquet shards"):
        validate_shards(str(tmp_path / "void"))


# --------------------------------------------------------------------------- resolve_paths / builtin cache


def _builtin_worker(cache: str, q) -> None:
    q.put(str(builtin_dir("digits", cache)))


def test_resolve_paths_builtin_and_errors(tmp_path):
    cache = tmp_path / "cache"
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_builtin_worker, args=(str(cache), q)) for _ in range(3)]
    for p in procs:
        p.start()
    results = {q.get(timeout=120) for _ in procs}
    for p in procs:
        p.join(60)
    assert results == {str(cache / "digits")}
    assert sorted(os.listdir(cache)) == [".digits.lock", "digits"]  # no temp dirs left behind
    tr, ev = resolve_paths(DataConfig(path="builtin:digits", cache_dir=str(cache)))
    assert (tr, ev) == (str(cache / "digits" / "train"), str(cache / "digits" / "test"))
    assert read_metadata(tr)["num_rows"] == 1437 and read_metadata(ev)["num_rows"] == 360
    with pytest.raises(DataError, match="data.path is empty"):
        resolve_paths(DataConfig(path=" "))
    with pytest.raises(DataError, match="unknown built-in set builtin:mnist"):
        resolve_paths(DataConfig(path="builtin:mnist", cache_dir=str(cache)))
    with pytest.raises(DataError, match=r"data.path: .*nowhere does not exist"):
        resolve_paths(DataConfig(path=str(tmp_path / "nowhere"), eval_path=tr))
    with pytest.raises(ConfigError, match="data.eval_path is needed"):
        resolve_paths(DataConfig(path=tr))
    with pytest.raises(DataError, match=r"data.eval_path: .*gone does not exist"):
        resolve_paths(DataConfig(path=tr, eval_path=str(tmp_path / "gone")))
    assert resolve_paths(DataConfig(path=tr, eval_path="builtin:digits", cache_dir=str(cache))) == (tr, ev)


# --------------------------------------------------------------------------- CLI


def test_cli_convert_and_inspect(tmp_path, capsys):
    src = tmp_path / "src"
    make_folder(src, {"a": 4, "b": 3}, size=30)
    assert data_main(["convert", str(src), str(tmp_path / "ds"), "--shard-rows", "3"]) == 0
    out = capsys.readouterr()
    assert "7 rows in 3 shards" in out.out and "a: 4, b: 3" in out.out and "3/3 shards" in out.err
    assert data_main(["convert", str(src), str(tmp_path / "ds"), "--shard-rows", "2"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert data_main(["convert", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    grids = tmp_path / "grids"
    assert data_main(["inspect", str(tmp_path / "ds"), "--out", str(grids), "--samples", "6", "--pairs", "4",
                      "--set", "data.image_size=16", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_rows"] == 7 and summary["counts"] == {"a": 4, "b": 3} and summary["num_shards"] == 3
    assert summary["images"]["encoded_formats"] == {"PNG": 5, "JPEG": 2}  # BMPs were transcoded to PNG
    for name in ("samples.png", "pairs.png"):
        with Image.open(grids / name) as im:
            assert im.size[0] > 64 and im.size[1] > 64
    assert data_main(["inspect", str(tmp_path / "ds"), "--samples", "0", "--pairs", "0"]) == 0
    text = capsys.readouterr().out
    assert "rows: 7" in text and "part-00002.parquet" in text
    assert data_main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_builtin_digits(tmp_path, capsys):
    assert data_main(["convert", "--builtin", "digits", str(tmp_path / "d"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "1437 rows" in out and "360 rows" in out
    assert data_main(["convert", "--builtin", "digits", "a", "b"]) == 2


def test_encoded_bytes_survive_untouched(tmp_path):
    # JPEG bytes are stored as found: decoding them in the pipeline gives exactly PIL's decode of the file.
    arr = rand_images(1, 40)[0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=80)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "x.jpeg").write_bytes(buf.getvalue())
    convert(tmp_path / "s", tmp_path / "d")
    [row] = read_rows(tmp_path / "d").values()
    assert np.array_equal(row["pixels"], np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
