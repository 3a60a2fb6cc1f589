"""Dataset layouts users have on disk, recognised by ``simsiam data convert`` when SRC is a folder:

* ``cifar-10-batches-py`` (CIFAR-10, python version): ``data_batch_1`` .. ``data_batch_5``,
  ``test_batch`` and ``batches.meta``, pickled dicts with ``b'data'`` (N x 3072 uint8, channel-major
  32 x 32), ``b'labels'`` and ``b'label_names'``. Written as DEST/train (50,000) and DEST/test (10,000).
* ``cifar-100-python`` (CIFAR-100): ``train``, ``test`` and ``meta`` with ``b'fine_labels'`` and
  ``b'fine_label_names'`` (the 100 classes the paper's protocols use). DEST/train and DEST/test.
* An ImageNet-style split folder: ``train/`` with one sub-folder per class and ``val/`` either with
  the same class sub-folders or flat (images in ``val/`` or ``val/images/``) plus a labels file. The
  labels file is ``--val-labels FILE`` or, when not given, the first of ``LOC_val_solution.csv``
  (Kaggle's ImageNet: ``ImageId,PredictionString``, the class is the first token of the string),
  ``val_annotations.txt`` (Tiny-ImageNet), ``val_labels.txt`` or ``labels.txt`` found in SRC or in
  ``val/``. A text labels file has one ``filename label`` line per image (whitespace-separated; more
  columns are ignored); a .csv file has a header naming the file column (ImageId, filename, file,
  image or path) and the label column (PredictionString, label, class or wnid). A label is a train
  class folder name or, if it is no folder's name, an integer index into the sorted class folders (as
  caffe's ``val.txt``). Filenames match with or without their extension. Val labels always use the
  train set's class indices. Written as DEST/train and DEST/val; a ``test/`` folder is not converted
  (ImageNet's has no labels).

The CIFAR pickles are read with an unpickler that only builds numpy arrays and plain containers, so a
tampered file cannot run code.
"""
from __future__ import annotations

import csv
import hashlib
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from simsiam.data.schema import DataError
from simsiam.data.sources import IMAGE_EXTENSIONS, Source, array_source, files_source, folder_source, images_under

CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
LABEL_FILES = ("LOC_val_solution.csv", "val_annotations.txt", "val_labels.txt", "labels.txt")
_CSV_FILE_COLUMNS = ("ImageId", "filename", "file", "image", "path")
_CSV_LABEL_COLUMNS = ("PredictionString", "label", "class", "wnid")


def detect(src: Path) -> str | None:
    """``"cifar10"``, ``"cifar100"``, ``"split"`` (train/ + val/) or None (a plain image folder)."""
    if (src / "batches.meta").is_file() and (src / "data_batch_1").is_file():
        return "cifar10"
    if all((src / n).is_file() for n in ("meta", "train", "test")):
        return "cifar100"
    if (src / "train").is_dir() and (src / "val").is_dir():
        return "split"
    return None


# --------------------------------------------------------------------------- CIFAR pickles


class _ArrayUnpickler(pickle.Unpickler):
    """Builds only what the CIFAR files hold: dicts, lists, bytes and numpy arrays."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds only numpy "
                                         "arrays and lists")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path}: missing (expected in a {path.parent.name} CIFAR folder)") from None
    except Exception as e:  # pickle raises many types on a corrupt or foreign file
        raise DataError(f"{path}: not a readable CIFAR python pickle: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return obj


def _field(obj: dict, path: Path, key: str) -> Any:
    for k in (key.encode(), key):  # b'data' in the originals; str keys from re-pickled copies
        if k in obj:
            return obj[k]
    keys = ", ".join(sorted(repr(k) for k in obj))
    raise DataError(f"{path}: no field b'{key}' (found {keys})")


def _cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 32, 32, 3) uint8 images and (N,) int64 labels from one CIFAR batch file."""
    obj = _load_pickle(path)
    data = np.asarray(_field(obj, path, "data"))
    labels = np.asarray(_field(obj, path, label_key))
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: field b'data' has shape {data.shape}; CIFAR rows are 3072 bytes (3 x 32 x 32)")
    if data.dtype != np.uint8:
        raise DataError(f"{path}: field b'data' is {data.dtype}; CIFAR pixels are uint8")
    if labels.ndim != 1 or len(labels) != len(data):
        raise DataError(f"{path}: field b'{label_key}' has {labels.size} entries for {len(data)} images")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: field b'{label_key}' holds {labels.dtype}, not integer class indices")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: field b'{label_key}' has labels {labels.min()}..{labels.max()}; "
                        f"there are {num_classes} class names")
    # Rows are channel-major (1024 red, 1024 green, 1024 blue), each plane row by row.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int64)


def _names(obj: dict, path: Path, key: str) -> list[str]:
    names = _field(obj, path, key)
    if not isinstance(names, (list, tuple)) or not names:
        raise DataError(f"{path}: field b'{key}' must be a non-empty list of class names")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _file_fingerprint(paths: list[Path]) -> str:
    digest = hashlib.sha1()
    for p in paths:
        st = p.stat()
        digest.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cifar_sources(src: Path, kind: str) -> dict[str, Source]:
    """{"train": source, "test": source} for a ``cifar-10-batches-py`` or ``cifar-100-python`` folder."""
    if kind == "cifar10":
        meta_path, label_key, names_key = src / "batches.meta", "labels", "label_names"
        splits = {"train": [src / n for n in CIFAR10_TRAIN], "test": [src / "test_batch"]}
    else:
        meta_path, label_key, names_key = src / "meta", "fine_labels", "fine_label_names"
        splits = {"train": [src / "train"], "test": [src / "test"]}
    class_names = _names(_load_pickle(meta_path), meta_path, names_key)
    out = {}
    for split, paths in splits.items():
        parts = [_cifar_batch(p, label_key, len(class_names)) for p in paths]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        fp = {"type": kind, "path": str(src.resolve()), "split": split,
              "files_sha1": _file_fingerprint([meta_path, *paths])}
        out[split] = array_source(images, labels, class_names, fp, f"{kind}/{split}", f"{src}[{split}]")
    return out


# --------------------------------------------------------------------------- ImageNet-style train/val


def _find_label_file(src: Path, given: str | os.PathLike | None) -> Path | None:
    if given:
        p = Path(given)
        if not p.is_file():
            raise DataError(f"--val-labels {p}: no such file")
        return p
    for folder in (src, src / "val"):
        for name in LABEL_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


def _label_index(value: str, class_names: list[str], where: str) -> int:
    if value in class_names:
        return class_names.index(value)
    try:
        i = int(value)
    except ValueError:
        raise DataError(f"{where}: label {value!r} is not a class folder of train/ (e.g. "
                        f"{', '.join(class_names[:3])})") from None
    if not 0 <= i < len(class_names):
        raise DataError(f"{where}: label index {i} is out of range; train/ has {len(class_names)} classes")
    return i


def read_label_file(path: Path, class_names: list[str]) -> dict[str, int]:
    """{filename as written: train class index} from a ``filename label`` text file or a .csv with a header."""
    out: dict[str, int] = {}
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the labels file: {e}") from None
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        cols = reader.fieldnames or []
        fcol = next((c for c in _CSV_FILE_COLUMNS if c in cols), None)
        lcol = next((c for c in _CSV_LABEL_COLUMNS if c in cols), None)
        if fcol is None or lcol is None:
            raise DataError(f"{path}: header {','.join(cols) or '(none)'} lacks a file column "
                            f"({'/'.join(_CSV_FILE_COLUMNS)}) or a label column ({'/'.join(_CSV_LABEL_COLUMNS)})")
        rows = ((i + 2, r.get(fcol) or "", (r.get(lcol) or "").split()) for i, r in enumerate(reader))
    else:
        rows = ((i + 1, *(line.split()[:1] or [""]), line.split()[1:])
                for i, line in enumerate(text.splitlines()) if line.strip() and not line.lstrip().startswith("#"))
    for lineno, name, rest in rows:
        where = f"{path}:{lineno}"
        if not name or not rest:
            raise DataError(f"{where}: expected a filename and a label")
        if name in out:
            raise DataError(f"{where}: {name} is labelled twice")
        out[name] = _label_index(rest[0], class_names, where)
    if not out:
        raise DataError(f"{path}: no labels in the file")
    return out


def split_sources(src: Path, val_labels: str | os.PathLike | None = None) -> dict[str, Source]:
    """{"train": source, "val": source} for a folder with ``train/`` (class folders) and ``val/``."""
    train = folder_source(src / "train")
    if not train.class_names:
        raise DataError(f"{src / 'train'}: needs one sub-folder per class (found images at its top level)")
    classes = train.class_names
    val_dir = src / "val"

    def top_images(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")
                      and p.name.lower().endswith(IMAGE_EXTENSIONS))

    class_dirs = sorted(d for d in val_dir.iterdir() if d.is_dir() and not d.name.startswith(".")
                        and images_under(d))
    flat_dir = val_dir
    if [d.name for d in class_dirs] == ["images"] and "images" not in classes:  # Tiny-ImageNet: val/images/
        flat_dir, class_dirs = val_dir / "images", []
    if class_dirs and top_images(val_dir):
        raise DataError(f"{val_dir}: has both images at the top level and class sub-folders; use one layout")
    files: list[tuple[str, str, int]] = []
    if class_dirs:
        if val_labels:
            raise DataError(f"--val-labels: {val_dir} already has class sub-folders; drop the option")
        for d in class_dirs:
            if d.name not in classes:
                raise DataError(f"{d}: class folder not in train/ (train has {len(classes)} classes, e.g. "
                                f"{', '.join(classes[:3])})")
            label = classes.index(d.name)
            files += [(p.relative_to(val_dir).as_posix(), str(p), label) for p in images_under(d)]
        extra = {"val_layout": "class folders"}
    else:
        label_file = _find_label_file(src, val_labels)
        if label_file is None:
            raise DataError(f"{val_dir}: flat (no class sub-folders) and no labels file; pass --val-labels FILE "
                            f"or put one of {', '.join(LABEL_FILES)} in {src} or {val_dir}")
        labels = read_label_file(label_file, classes)
        images = top_images(flat_dir)
        used: set[str] = set()
        unlabelled = []
        for p in images:
            key = p.name if p.name in labels else p.stem if p.stem in labels else None
            if key is None:
                unlabelled.append(p.name)
                continue
            used.add(key)
            files.append((p.name, str(p), labels[key]))
        if unlabelled:
            raise DataError(f"{label_file}: no label for {len(unlabelled)} image(s) of {flat_dir} (e.g. "
                            f"{', '.join(unlabelled[:3])})")
        missing = sorted(set(labels) - used)
        if missing:
            raise DataError(f"{label_file}: labels {len(missing)} image(s) not found in {flat_dir} (e.g. "
                            f"{', '.join(missing[:3])})")
        st = label_file.stat()
        extra = {"val_layout": "flat", "labels_file": str(label_file.resolve()), "labels_size": st.st_size,
                 "labels_mtime_ns": st.st_mtime_ns}
    return {"train": train, "val": files_source(val_dir, files, classes, extra)}

