"""What each Ray Data task does to one batch of shard rows: decode, then the geometric augmentation
(two views for pretraining, one for linear evaluation) or the deterministic eval view; or, for
decoding on the train worker's device (``data.decode: gpu``), only the crop boxes and flips.

Only numpy, pyarrow and PIL: every Ray Data worker process imports this module, and keeping torch out
of it saves seconds of start-up per process (measured: 0.7 s against 6.4 s when this code sat next to
the torch-side iterators).
"""
from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from simsiam import ray_compat
from simsiam.augment.geometric import GeometricAugment, eval_transform
from simsiam.data.decode import BadImage, Rows, probe


def _batch_rng(seed: int, rows: Rows) -> np.random.Generator:
    """A generator for one batch: fixed by the seed, the epoch (Ray's execution index) and the rows.

    Two epochs of one image get different views; rerunning a batch (task retry) gets the same ones.
    """
    epoch = ray_compat.execution_index()
    key = zlib.crc32("\0".join(map(str, rows.ids)).encode())
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, key, rows.n])


def _transform_rows(rows: Rows, views: int, image_size: int, transform: Callable[[np.ndarray], np.ndarray],
                    max_pixels: int, on_bad_image: str, labels_for: str | None = None
                    ) -> tuple[list[np.ndarray], np.ndarray]:
    """Decode every row and apply ``transform`` ``views`` times; returns the views and a ``valid`` mask.

    A bad row (undecodable, over the pixel limit, or unlabeled where ``labels_for`` needs labels) raises
    a DataError naming shard and row, or under ``on_bad_image: skip`` keeps zero pixels and valid False.
    """
    out = [np.zeros((rows.n, 3, image_size, image_size), np.uint8) for _ in range(views)]
    valid = np.ones(rows.n, bool)
    for i in range(rows.n):
        try:
            if labels_for and rows.labels[i] < 0:
                raise BadImage(f"label is missing (-1) but {labels_for} needs labels")
            img = rows.decode(i, max_pixels)
        except BadImage as e:
            if on_bad_image != "skip":
                raise rows.bad(i, str(e)) from None
            valid[i] = False
            continue
        for view in out:
            view[i] = transform(img)
    return out, valid


def train_batch(table: pa.Table, image_size: int, min_scale: float, max_pixels: int, on_bad_image: str,
                 seed: int) -> dict[str, np.ndarray]:
    rows = Rows(table)
    geo, rng = GeometricAugment(image_size, min_scale), _batch_rng(seed, rows)
    (v1, v2), valid = _transform_rows(rows, 2, image_size, lambda img: geo(img, rng), max_pixels, on_bad_image)
    return {"view1": v1, "view2": v2, "valid": valid}


def eval_batch(table: pa.Table, image_size: int, resize_ratio: float, max_pixels: int,
                on_bad_image: str) -> dict[str, np.ndarray]:
    rows = Rows(table)
    (out,), valid = _transform_rows(rows, 1, image_size, lambda img: eval_transform(img, image_size, resize_ratio),
                                    max_pixels, on_bad_image, labels_for="evaluation")
    return {"image": out, "label": rows.labels, "valid": valid}


def labeled_batch(table: pa.Table, image_size: int, min_scale: float, max_pixels: int, on_bad_image: str,
                   seed: int) -> dict[str, np.ndarray]:
    rows = Rows(table)
    geo, rng = GeometricAugment(image_size, min_scale), _batch_rng(seed, rows)
    (out,), valid = _transform_rows(rows, 1, image_size, lambda img: geo(img, rng), max_pixels, on_bad_image,
                                    labels_for="linear evaluation")
    return {"image": out, "label": rows.labels, "valid": valid}


def train_batch_encoded(table: pa.Table, image_size: int, min_scale: float, max_pixels: int, on_bad_image: str,
                        seed: int) -> dict[str, np.ndarray]:
    """Pretraining rows for decoding on the train worker's device (``data.decode: gpu``): each JPEG's
    bytes as stored, ``crop`` int32 (N, 2, 4) = (top, left, h, w) per view, ``flip`` bool (N, 2), ``valid``
    and ``where`` (shard and row id, for the worker's error messages).

    The boxes come from the header's size, drawn from the same generator in the same order as
    :func:`train_batch` draws them, so both paths crop the same boxes for the same seed. A row that is
    not JPEG is refused (it is a data/config mismatch, not a bad image): the message names it.
    """
    rows = Rows(table)
    geo, rng = GeometricAugment(image_size, min_scale), _batch_rng(seed, rows)
    crop = np.zeros((rows.n, 2, 4), np.int32)
    flip = np.zeros((rows.n, 2), bool)
    valid = np.ones(rows.n, bool)
    images: list[bytes] = []
    for i in range(rows.n):
        data = rows.images[i]
        try:
            fmt, h, w = ("raw pixels", 0, 0) if rows.heights[i] is not None else probe(data, max_pixels)
        except BadImage as e:
            if on_bad_image != "skip":
                raise rows.bad(i, str(e)) from None
            valid[i] = False
            images.append(b"")
            continue
        if fmt != "JPEG":
            raise rows.bad(i, f"{fmt} image, but data.decode=gpu decodes only JPEG (on the device); use "
                              "data.decode=cpu, or auto, which picks cpu for data that is not JPEG")
        for v in range(2):
            top, left, ch, cw, flip[i, v] = geo.draw(h, w, rng)
            crop[i, v] = (top, left, ch, cw)
        images.append(bytes(data))
    return {"image": np.array(images, dtype=object), "crop": crop, "flip": flip, "valid": valid,
            "where": np.array([rows.where(i) for i in range(rows.n)], dtype=object)}
