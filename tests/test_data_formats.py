"""Real dataset layouts through `simsiam data convert` (no Ray): CIFAR-10/100 python pickle folders built
byte-for-byte in the originals' format (pickled dicts with bytes keys, channel-major uint8 rows), and
ImageNet-style train/val folders with val as class folders, flat with Kaggle's LOC_val_solution.csv,
Tiny-ImageNet's val/images + val_annotations.txt, or a 'filename index' file; bad inputs name the file
and the field."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simsiam.data.cli import main as data_main
from simsiam.data.convert import convert
from simsiam.data.schema import DataError, read_metadata
from tests.test_data_convert import read_rows

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the originals are protocol-2 pickles read with encoding="bytes"


def make_cifar10(root: Path, per_batch: int = 6, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A cifar-10-batches-py folder; returns split -> (N x 3072 rows, labels) in file order."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    _dump(root / "batches.meta", {b"num_cases_per_batch": per_batch, b"num_vis": 3072,
                                  b"label_names": [n.encode() for n in CIFAR10_NAMES]})
    out: dict[str, list] = {"train": [[], []], "test": [[], []]}
    for name, split in [(f"data_batch_{i}", "train") for i in range(1, 6)] + [("test_batch", "test")]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, per_batch)]
        _dump(root / name, {b"batch_label": f"{name} of 5".encode(), b"labels": labels, b"data": data,
                            b"filenames": [f"img_{name}_{i}.png".encode() for i in range(per_batch)]})
        out[split][0].append(data)
        out[split][1] += labels
    return {s: (np.concatenate(d), lab) for s, (d, lab) in out.items()}


def make_cifar100(root: Path, n: int = 8, seed: int = 1) -> dict[str, tuple[np.ndarray, list[int]]]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    fine = [f"fine{i}" for i in range(100)]
    _dump(root / "meta", {b"fine_label_names": [x.encode() for x in fine],
                          b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    out = {}
    for split in ("train", "test"):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 100, n)]
        _dump(root / split, {b"filenames": [f"{split}_{i}.png".encode() for i in range(n)],
                             b"batch_label": f"{split} batch 1 of 1".encode(), b"fine_labels": labels,
                             b"coarse_labels": [x // 5 for x in labels], b"data": data})
        out[split] = (data, labels)
    return out


def _check_cifar(dest: Path, expected: dict, names: list[str], kind: str) -> None:
    for split, (data, labels) in expected.items():
        meta = read_metadata(str(dest / split))
        assert meta["class_names"] == names and meta["num_rows"] == len(labels)
        rows = read_rows(dest / split)
        assert len(rows) == len(labels)
        for i, (row_bytes, label) in enumerate(zip(data, labels, strict=True)):
            row = rows[f"{kind}/{split}/{i:06d}"]
            assert row["label"] == label
            # channel-major 3 x 32 x 32 -> H x W x C, exactly
            np.testing.assert_array_equal(row["pixels"], row_bytes.reshape(3, 32, 32).transpose(1, 2, 0))


def test_cifar10_python_folder_round_trips_through_the_cli(tmp_path, capsys):
    src = tmp_path / "cifar-10-batches-py"
    expected = make_cifar10(src)
    assert data_main(["convert", str(src), str(tmp_path / "cifar10"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "train: 30 rows" in out.replace(str(tmp_path / "cifar10") + "/", "")
    _check_cifar(tmp_path / "cifar10", expected, CIFAR10_NAMES, "cifar10")
    # The preset's paths are DEST/train and DEST/test: `simsiam run cifar10` needs no --set after this.
    from simsiam import config as C
    from simsiam.data import resolve_paths

    cfg = C.load("cifar10", {"data.path": str(tmp_path / "cifar10/train"),
                             "data.eval_path": str(tmp_path / "cifar10/test")})
    assert resolve_paths(cfg.data) == (str(tmp_path / "cifar10/train"), str(tmp_path / "cifar10/test"))
    # The same command again is a no-op.
    assert all(r.up_to_date for r in convert(src, tmp_path / "cifar10"))


def test_cifar100_python_folder_uses_the_fine_labels(tmp_path):
    src = tmp_path / "cifar-100-python"
    expected = make_cifar100(src)
    reports = convert(src, tmp_path / "c100")
    assert [Path(r.dest).name for r in reports] == ["train", "test"]
    _check_cifar(tmp_path / "c100", expected, [f"fine{i}" for i in range(100)], "cifar100")


def test_bad_cifar_files_are_named_with_the_field(tmp_path):
    src = tmp_path / "cifar-10-batches-py"
    make_cifar10(src, per_batch=2)
    good = (src / "data_batch_3").read_bytes()

    def write(obj):
        _dump(src / "data_batch_3", obj)

    write({b"data": np.zeros((2, 3072), np.uint8), b"batch_label": b"x"})
    with pytest.raises(DataError, match=r"data_batch_3: no field b'labels' \(found b'batch_label', b'data'\)"):
        convert(src, tmp_path / "o1")
    write({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DataError, match=r"data_batch_3: field b'data' has shape \(2, 1024\); CIFAR rows are 3072"):
        convert(src, tmp_path / "o2")
    write({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    with pytest.raises(DataError, match=r"data_batch_3: field b'labels' has labels 0..10; there are 10 class"):
        convert(src, tmp_path / "o3")
    write({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})
    with pytest.raises(DataError, match=r"data_batch_3: field b'labels' has 1 entries for 2 images"):
        convert(src, tmp_path / "o4")
    (src / "data_batch_3").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="data_batch_3: not a readable CIFAR python pickle"):
        convert(src, tmp_path / "o5")

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    with open(src / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Evil()}, f, protocol=2)
    with pytest.raises(DataError, match=r"data_batch_3: .*refusing to load io.open"):
        convert(src, tmp_path / "o6")
    assert not (tmp_path / "pwned").exists()
    (src / "data_batch_3").write_bytes(good)
    (src / "data_batch_5").unlink()
    with pytest.raises(DataError, match="data_batch_5: missing"):
        convert(src, tmp_path / "o7")
    # Nothing half-written for any of the failures.
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 8))


# --------------------------------------------------------------------------- ImageNet-style train/val

WNIDS = ["n01440764", "n01443537", "n01484850"]


def _images(folder: Path, names: list[str], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for n in names:
        arr = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / n)  # .JPEG/.png by name; PNG keeps the pixels exact
        out[n] = arr
    return out


def make_train(root: Path) -> None:
    for i, w in enumerate(WNIDS):
        _images(root / "train" / w, [f"{w}_{k}.png" for k in range(3)], seed=i)


def _labels(dest: Path) -> dict[str, int]:
    return {rid: r["label"] for rid, r in read_rows(dest).items()}


def test_imagenet_val_as_class_folders_uses_the_train_class_indices(tmp_path):
    src = tmp_path / "imagenet"
    make_train(src)
    # val has only two of the three classes: indices must still be train's (n01484850 -> 2, not 1).
    _images(src / "val" / WNIDS[0], ["a.png"], 10)
    _images(src / "val" / WNIDS[2], ["b.png", "c.png"], 11)
    reports = convert(src, tmp_path / "out")
    assert [Path(r.dest).name for r in reports] == ["train", "val"]
    assert read_metadata(str(tmp_path / "out/val"))["class_names"] == WNIDS
    assert _labels(tmp_path / "out/val") == {f"{WNIDS[0]}/a.png": 0, f"{WNIDS[2]}/b.png": 2, f"{WNIDS[2]}/c.png": 2}
    assert read_metadata(str(tmp_path / "out/train"))["counts"] == {"0": 3, "1": 3, "2": 3}
    _images(src / "val" / "n09999999", ["d.png"], 12)
    with pytest.raises(DataError, match=r"val/n09999999: class folder not in train/"):
        convert(src, tmp_path / "out2")


def test_imagenet_flat_val_with_kaggle_loc_val_solution(tmp_path):
    src = tmp_path / "ILSVRC"
    make_train(src)
    pixels = _images(src / "val", ["ILSVRC2012_val_00000001.png", "ILSVRC2012_val_00000002.png"], 20)
    (src / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        f"ILSVRC2012_val_00000002,{WNIDS[1]} 10 20 200 300 {WNIDS[1]} 5 5 50 50\n"
        f"ILSVRC2012_val_00000001,{WNIDS[2]} 1 2 3 4\n")
    assert data_main(["convert", str(src), str(tmp_path / "out"), "--quiet"]) == 0
    rows = read_rows(tmp_path / "out/val")
    assert {k: r["label"] for k, r in rows.items()} == {"ILSVRC2012_val_00000001.png": 2,
                                                        "ILSVRC2012_val_00000002.png": 1}
    np.testing.assert_array_equal(rows["ILSVRC2012_val_00000002.png"]["pixels"],
                                  pixels["ILSVRC2012_val_00000002.png"])
    # A label that is no train class, an image without a label, a label without an image: named.
    (src / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n0 1 2 3 4\n")
    with pytest.raises(DataError, match=r"LOC_val_solution.csv:2: label 'n0' is not a class folder of train/"):
        convert(src, tmp_path / "o1")
    (src / "LOC_val_solution.csv").write_text(f"ImageId,PredictionString\nILSVRC2012_val_00000001,{WNIDS[0]}\n")
    with pytest.raises(DataError, match=r"LOC_val_solution.csv: no label for 1 image\(s\) .*ILSVRC2012_val_00000002"):
        convert(src, tmp_path / "o2")
    (src / "LOC_val_solution.csv").write_text("Id,Label\nx,y\n")
    with pytest.raises(DataError, match=r"LOC_val_solution.csv: header Id,Label lacks a file column"):
        convert(src, tmp_path / "o3")
    (src / "LOC_val_solution.csv").unlink()
    with pytest.raises(DataError, match=r"val: flat \(no class sub-folders\) and no labels file; pass --val-labels"):
        convert(src, tmp_path / "o4")


def test_tiny_imagenet_layout_and_a_filename_index_file(tmp_path):
    src = tmp_path / "tiny"
    make_train(src)
    _images(src / "val" / "images", ["val_0.png", "val_1.png"], 30)
    (src / "val" / "val_annotations.txt").write_text(f"val_0.png\t{WNIDS[1]}\t0\t1\t30\t40\n"
                                                     f"val_1.png\t{WNIDS[0]}\t2\t3\t10\t12\n")
    convert(src, tmp_path / "out")
    assert _labels(tmp_path / "out/val") == {"val_0.png": 1, "val_1.png": 0}
    # caffe-style 'filename index' (index into the sorted class folders), given explicitly.
    labels = tmp_path / "val.txt"
    labels.write_text("# caffe val.txt\nval_0.png 2\nval_1.png 1\n")
    convert(src, tmp_path / "out2", val_labels=labels)
    assert _labels(tmp_path / "out2/val") == {"val_0.png": 2, "val_1.png": 1}
    labels.write_text("val_0.png 3\nval_1.png 1\n")
    with pytest.raises(DataError, match=r"val.txt:1: label index 3 is out of range; train/ has 3 classes"):
        convert(src, tmp_path / "o3", val_labels=labels)
    labels.write_text("val_0.png\nval_1.png 1\n")
    with pytest.raises(DataError, match=r"val.txt:1: expected a filename and a label"):
        convert(src, tmp_path / "o4", val_labels=labels)
    json.dumps(read_metadata(str(tmp_path / "out2/val"))["source"])  # the labels file is in the fingerprint
    assert read_metadata(str(tmp_path / "out2/val"))["source"]["labels_file"] == str(labels.resolve())


def test_the_held_out_stand_in_is_a_class_folder_set_that_convert_reads(tmp_path):
    """tools/heldout_proxy.py (the README's check that `sample` is not tuned to one generator) writes
    32 px RGB PNGs in train/ and val/ class folders, the same bytes for the same seed."""
    from tools.heldout_proxy import CLASSES
    from tools.heldout_proxy import main as proxy_main

    assert proxy_main([str(tmp_path / "a"), "--train-per-class", "3", "--val-per-class", "2", "--seed", "4"]) == 0
    assert proxy_main([str(tmp_path / "b"), "--train-per-class", "3", "--val-per-class", "2", "--seed", "4"]) == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 5 * len(CLASSES) and not [f for f in files if f.suffix != ".png"]
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    with Image.open(tmp_path / "a" / files[0]) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    convert(tmp_path / "a", tmp_path / "out")
    for split, n in (("train", 3), ("val", 2)):
        meta = read_metadata(str(tmp_path / "out" / split))
        assert meta["class_names"] == sorted(CLASSES)
        assert meta["counts"] == {str(i): n for i in range(len(CLASSES))}
