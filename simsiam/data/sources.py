"""Conversion sources: what ``simsiam data convert`` can read, as :class:`Source` objects.

A source knows its rows (image files, or an in-memory array), its class names and a fingerprint of
its input (part of the resume plan: a changed input is a different conversion). It cuts itself into
picklable per-shard payloads; a worker process builds and writes each shard from its payload alone
(see :mod:`simsiam.data.shard_writer`), so the parent never holds more than the source's index.

Here: image folders (:func:`folder_source`, :func:`files_source`), arrays (:func:`array_source`), .npz
files (:func:`npz_sources`) and the built-in sets (:data:`BUILTIN_SOURCES`). The dataset layouts of
:mod:`simsiam.data.formats` (CIFAR pickles, ImageNet-style train/val) build on these.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simsiam.data.schema import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
RAW_MAX_SIDE = 64               # arrays with both sides <= this are stored raw, larger ones as PNG


@dataclass
class Source:
    """One dataset directory's rows to convert: image ``files`` or an ``images`` array (+ ``labels``)."""

    kind: str                 # "files" or "array"
    fingerprint: dict         # identifies the input; part of the resume plan
    num_rows: int
    class_names: list[str]
    storage: str              # "encoded" or "raw" (arrays <= 64 px)
    est_row_bytes: int
    files: list[tuple[str, str, int]] | None = None   # (id, absolute path, label)
    images: np.ndarray | None = None
    labels: np.ndarray | None = None
    id_prefix: str = ""

    def payload(self, start: int, stop: int) -> tuple:
        """The picklable input of the shard holding rows ``start:stop`` (see :mod:`simsiam.data.shard_writer`)."""
        if self.kind == "files":
            return ("files", self.files[start:stop])
        return ("array", np.ascontiguousarray(self.images[start:stop]), self.labels[start:stop],
                self.id_prefix, start, self.storage)


def images_under(d: Path) -> list[Path]:
    """Image files anywhere under ``d``, in a stable (sorted) order; hidden files and folders skipped."""
    out = []
    for root, dirs, names in os.walk(d):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        out += [Path(root) / n for n in sorted(names)
                if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
    return out


def folder_source(src: Path) -> Source:
    """An image folder: one sub-folder per class (labels in sorted folder order), or images at its top
    level (unlabeled, -1); hidden files and folders are skipped."""
    if not src.is_dir():
        raise DataError(f"SRC {src}: not a directory, .npz file or --builtin name")
    top_files = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.name.lower().endswith(IMAGE_EXTENSIONS))
    class_dirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_dirs = [d for d in class_dirs if images_under(d)]
    if top_files and class_dirs:
        raise DataError(f"SRC {src}: has both images at the top level ({top_files[0].name}, ...) and class "
                        f"sub-folders ({class_dirs[0].name}, ...); use one layout")
    files: list[tuple[str, str, int]] = []
    if class_dirs:
        class_names = [d.name for d in class_dirs]
        for label, d in enumerate(class_dirs):
            files += [(p.relative_to(src).as_posix(), str(p), label) for p in images_under(d)]
    else:
        class_names = []
        files = [(p.name, str(p), -1) for p in top_files]
    return files_source(src, files, class_names)


def files_source(src: Path, files: list[tuple[str, str, int]], class_names: list[str],
                 extra: dict | None = None) -> Source:
    """A source of image files ``(id, path, label)`` found under ``src``, fingerprinted by names, sizes
    and mtimes (so a resume notices changed files)."""
    if not files:
        raise DataError(f"SRC {src}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    digest = hashlib.sha1()
    total = 0
    for rel, path, label in files:
        st = os.stat(path)
        total += st.st_size
        digest.update(f"{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return Source("files", {"type": "folder", "path": str(src.resolve()), "files": len(files),
                             "sha1": digest.hexdigest(), **(extra or {})},
                   len(files), class_names, "encoded", max(1, total // len(files)), files=files)


def _as_nhwc(images: np.ndarray, where: str) -> np.ndarray:
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise DataError(f"{where}: expected images shaped (N, H, W), (N, H, W, C) or (N, C, H, W), "
                        f"got {images.shape}")
    if images.shape[-1] not in (1, 3, 4) and images.shape[1] in (1, 3):
        images = images.transpose(0, 2, 3, 1)
    if images.shape[-1] == 4:
        images = images[..., :3]
    if images.shape[-1] not in (1, 3):
        raise DataError(f"{where}: cannot tell the channel axis of images shaped {images.shape} "
                        "(need 1 or 3 channels first or last)")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.integer):
            raise DataError(f"{where}: images must be uint8 (0..255), got {images.dtype}; scale and cast them "
                            "first")
        lo, hi = int(images.min()), int(images.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{where}: integer images must lie in 0..255, found {lo}..{hi}")
        images = images.astype(np.uint8)
    return images


def _labels_array(labels: np.ndarray | None, n: int, where: str) -> np.ndarray:
    if labels is None:
        return np.full(n, -1, dtype=np.int64)
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.shape[0] != n:
        raise DataError(f"{where}: labels shaped {labels.shape} do not match {n} images")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels must be integers, got {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < -1:
        raise DataError(f"{where}: labels must be >= 0 (or -1 for unknown), found {labels.min()}")
    return labels


def array_source(images: np.ndarray, labels: np.ndarray | None, class_names: list[str] | None,
                 fingerprint: dict, id_prefix: str, where: str) -> Source:
    """Images in memory, shaped (N, H, W), (N, H, W, C) or (N, C, H, W), uint8 or integers in 0..255,
    with integer ``labels`` (-1 unknown; None: all unknown). Sides <= RAW_MAX_SIDE are stored as raw
    pixels, larger images as PNG. ``where`` names the input in errors; row ids are ``id_prefix/000123``.
    """
    images = _as_nhwc(images, where)
    labels = _labels_array(labels, images.shape[0], where)
    if images.shape[0] == 0:
        raise DataError(f"{where}: no images (0 rows)")
    if class_names is None:
        top = int(labels.max()) if labels.size else -1
        class_names = [str(i) for i in range(top + 1)]
    elif labels.size and labels.max() >= len(class_names):
        raise DataError(f"{where}: label {labels.max()} but only {len(class_names)} class names")
    h, w, c = images.shape[1:]
    storage = "raw" if max(h, w) <= RAW_MAX_SIDE else "encoded"
    row_bytes = h * w * c if storage == "raw" else max(1, h * w * c // 2)
    fp = {**fingerprint, "shape": list(images.shape), "sha1": hashlib.sha1(
        images[:: max(1, len(images) // 64)].tobytes() + labels.tobytes()).hexdigest()}
    return Source("array", fp, int(images.shape[0]), list(class_names), storage, row_bytes,
                   images=images, labels=labels, id_prefix=id_prefix)


_NPZ_SPLITS = (("x_train", "y_train", "train"), ("x_test", "y_test", "test"))
_NPZ_SINGLE = (("images", "labels"), ("x", "y"), ("data", "labels"), ("X", "y"))
_NPZ_CLASS_NAMES = ("class_names", "label_names", "classes")


def npz_sources(src: Path, images_key: str | None, labels_key: str | None) -> dict[str | None, Source]:
    """{split name or None: source}. Split arrays (x_train/y_train, x_test/y_test) become DEST/train, DEST/test."""
    try:
        npz = np.load(src, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"SRC {src}: not a readable .npz file: {e}") from None
    with npz:
        keys = set(npz.files)
        class_names = None
        for k in _NPZ_CLASS_NAMES:
            if k in keys:
                class_names = [str(x) for x in npz[k].tolist()]
                break
        st = src.stat()
        base = {"type": "npz", "path": str(src.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if images_key:
            pairs = [(images_key, labels_key, None)]
        elif "x_train" in keys:
            pairs = [(x, y if y in keys else None, s) for x, y, s in _NPZ_SPLITS if x in keys]
        else:
            found = next(((x, y) for x, y in _NPZ_SINGLE if x in keys), None)
            if found is None:
                raise DataError(f"SRC {src}: no image array found; keys are {', '.join(sorted(keys))}. Expected "
                                "x_train/y_train (+ x_test/y_test), images/labels or x/y, or pass --images-key")
            pairs = [(found[0], labels_key or (found[1] if found[1] in keys else None), None)]
        out: dict[str | None, Source] = {}
        for x, y, split in pairs:
            if x not in keys:
                raise DataError(f"SRC {src}: no array {x!r}; keys are {', '.join(sorted(keys))}")
            if y is not None and y not in keys:
                raise DataError(f"SRC {src}: no array {y!r}; keys are {', '.join(sorted(keys))}")
            where = f"{src}[{x}]"
            out[split] = array_source(npz[x], npz[y] if y else None, class_names,
                                       {**base, "images_key": x, "labels_key": y}, split or src.stem, where)
        return out


def digits_split() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """scikit-learn's digits as uint8 (x 255/16), split 80/20 stratified with random_state=0.

    Returns {"train": (images, labels, original indices), "test": (...)}.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    idx = np.arange(len(images))
    tr, te = train_test_split(idx, test_size=0.2, random_state=0, stratify=d.target)
    return {"train": (images[tr], d.target[tr].astype(np.int64), tr),
            "test": (images[te], d.target[te].astype(np.int64), te)}


def _shapes_sources() -> dict[str | None, Source]:
    from simsiam.data import shapes

    out = {}
    for split, (images, labels) in shapes.shapes_split().items():
        fp = {"type": "builtin", "name": "shapes", "split": split, "version": shapes.VERSION, "seed": 0}
        out[split] = array_source(images, labels, list(shapes.CLASSES), fp, f"shapes/{split}", f"shapes[{split}]")
    return out


# The built-in sets: name -> sources of its train and test splits (``--builtin NAME``, ``builtin:NAME``).
BUILTIN_SOURCES: dict[str, Callable[[], dict[str | None, Source]]] = {}


def _digits_sources() -> dict[str | None, Source]:
    import sklearn

    out = {}
    for split, (images, labels, _) in digits_split().items():
        fp = {"type": "builtin", "name": "digits", "split": split, "sklearn": sklearn.__version__}
        out[split] = array_source(images, labels, [str(i) for i in range(10)], fp, f"digits/{split}",
                                   f"digits[{split}]")
    return out


BUILTIN_SOURCES.update(shapes=_shapes_sources, digits=_digits_sources)
