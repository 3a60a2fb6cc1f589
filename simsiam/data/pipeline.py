"""Ray Data pipelines: Parquet shards -> decoded, geometrically augmented uint8 views -> train workers.

Training::

    read_parquet (streaming, seeded file shuffle)
      -> map_batches (simsiam.data.batches, no torch): decode + two GeometricAugment views per image
         -> view1, view2 (N,3,S,S) uint8, valid
         (data.decode: gpu -> train_batch_encoded: JPEG bytes + both views' crop boxes and flips; the
          worker decodes and crops on its device, simsiam.data.device_decode)
      -> streaming_split to the workers (Ray Train's get_dataset_shard)
      -> iter_train_batches: iter_torch_batches with prefetch and a seeded local shuffle buffer
      -> PhotometricAugment on the worker's device (see simsiam.augment)

Only uint8 crops cross the object store, a quarter of the float bytes, and the per-pixel float work
runs batched where the model is. Evaluation: resize + centre crop, no randomness.

Bad rows (corrupt, truncated, over data.max_pixels, unlabeled where labels are needed) raise a
:class:`~simsiam.data.schema.DataError` naming the shard and row id, or under
``data.on_bad_image: skip`` come through as ``valid = False`` rows that the iterators drop and count.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from simsiam import ray_compat
from simsiam.config import DataConfig
from simsiam.data import batches
from simsiam.data.schema import (
    METADATA_FILE,
    DataError,
    ShardSet,
    is_uri,
    plain_data_errors,
    read_metadata,
    validate_shards,
)

# Output bytes per map_batches call: big enough to amortise task overhead, small enough that a few
# in flight fit any worker's memory.
_TARGET_BATCH_BYTES = 32 << 20
_DRIVER_READ_MAX_BYTES = 256 << 20
LINEAR_MIN_SCALE = 0.08  # the reference linear evaluation's RandomResizedCrop default


def ingest_options(data_cfg: DataConfig) -> ray.data.ExecutionOptions:
    """Ray Data execution options honouring ``data.data_cpus``.

    Ray Train replaces a dataset's execution options with its DataConfig's, so pass these there too:
    ``ray.train.DataConfig(execution_options=ingest_options(cfg.data))``.
    """
    from ray.data import DataContext

    # Start from the current options so other settings (and the object store limits: a bare
    # ExecutionResources(cpu=...) would cap them at 0) are kept.
    opts = copy.deepcopy(DataContext.get_current().execution_options)
    if data_cfg.data_cpus > 0:
        opts.resource_limits = opts.resource_limits.copy(cpu=data_cfg.data_cpus)
    return opts


def _task_cpus(data_cfg: DataConfig) -> float:
    # A task asking for more CPUs than the cap would never be scheduled.
    return min(1.0, data_cfg.data_cpus) if data_cfg.data_cpus > 0 else 1.0


def _rows_per_batch(image_size: int, views: int) -> int:
    return int(max(16, min(1024, _TARGET_BATCH_BYTES // (views * 3 * image_size * image_size))))


def _multi_node() -> bool:
    if not ray.is_initialized():
        return False
    return sum(1 for n in ray.nodes() if n.get("Alive")) > 1


def _read_on_driver(found: ShardSet) -> ray.data.Dataset:
    """Small local sets on a multi-node cluster: read here, hand the tables to Ray's object store."""
    tables = []
    for shard in found.shards:
        t = pq.read_table(shard, columns=found.columns)
        tables.append(t.append_column("path", pa.array([shard] * t.num_rows, pa.string())))
    return ray.data.from_arrow(tables)


def _read(data_cfg: DataConfig, path: str, what: str, shuffle_seed: int | None) -> ray.data.Dataset:
    found = validate_shards(path, what)
    if not is_uri(path) and found.num_bytes <= _DRIVER_READ_MAX_BYTES and _multi_node():
        # A local path is only known to exist on this node (the built-in sets' cache always is).
        ds = _read_on_driver(found)
        if shuffle_seed is not None:
            ds = ds.randomize_block_order(seed=shuffle_seed)
    else:
        from ray.data import FileShuffleConfig

        with ray_compat.parquet_reader_v1():  # one read task per file; see ray_compat
            ds = ray.data.read_parquet(
                found.shards, include_paths=True, num_cpus=_task_cpus(data_cfg),
                # A new file order every epoch (execution), reproducible from the seed.
                shuffle=FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True)
                if shuffle_seed is not None else None,
            ).select_columns([*found.columns, "path"])
    ds.context.execution_options = ingest_options(data_cfg)
    # Without this Ray replaces a task's exception by a generic UserCodeException and the DataError
    # naming the shard and row is lost to the consumer (only the remote traceback text remains).
    ds.context.raise_original_map_exception = True
    return ds


def train_dataset(data_cfg: DataConfig, path: str, seed: int, decode: str = "cpu") -> ray.data.Dataset:
    """Streaming training data: columns ``view1``, ``view2`` (uint8 (N, 3, S, S)) and ``valid`` (bool).

    Files are shuffled per epoch from ``seed``; each image gets two independent random resized crops
    (+ flips). A row with a bad image raises a DataError naming shard and row id, or under
    ``data.on_bad_image: skip`` stays with ``valid = False`` and zero pixels, for the consumer to count.
    ``decode="gpu"`` (resolved by :func:`simsiam.data.device_decode.resolve`): the JPEG bytes and the
    same crop boxes instead of the views, for the worker to decode on its device.
    """
    ds = _read(data_cfg, path, "data.path", shuffle_seed=int(seed))
    s = data_cfg.image_size
    return ds.map_batches(
        batches.train_batch_encoded if decode == "gpu" else batches.train_batch,
        batch_format="pyarrow", batch_size=_rows_per_batch(s, 2), num_cpus=_task_cpus(data_cfg),
        fn_kwargs={"image_size": s, "min_scale": data_cfg.crop_min_scale, "max_pixels": data_cfg.max_pixels,
                   "on_bad_image": data_cfg.on_bad_image, "seed": int(seed)},
    )


def _check_labeled(path: str, what: str) -> None:
    try:
        meta = read_metadata(path)
    except DataError:
        return  # shards without our metadata: labels are checked row by row instead
    counts = meta.get("counts") or {}
    if counts and all(int(k) < 0 for k in counts):
        raise DataError(f"{what}: {path} has no labels (every row is -1, per its {METADATA_FILE}); kNN and "
                        "linear evaluation need a labeled dataset")


def eval_dataset(data_cfg: DataConfig, path: str) -> ray.data.Dataset:
    """Deterministic eval data: ``image`` uint8 (N, 3, S, S) (resize + centre crop), ``label`` int64, ``valid``.

    Labels are required: a -1 label is a bad row (error naming shard and row, or skipped and counted).
    """
    _check_labeled(path, "eval data")
    ds = _read(data_cfg, path, "eval data", shuffle_seed=None)
    s = data_cfg.image_size
    return ds.map_batches(
        batches.eval_batch, batch_format="pyarrow", batch_size=_rows_per_batch(s, 1), num_cpus=_task_cpus(data_cfg),
        fn_kwargs={"image_size": s, "resize_ratio": data_cfg.eval_resize, "max_pixels": data_cfg.max_pixels,
                   "on_bad_image": data_cfg.on_bad_image},
    )


def labeled_train_dataset(data_cfg: DataConfig, path: str, seed: int,
                          min_scale: float = LINEAR_MIN_SCALE) -> ray.data.Dataset:
    """Augmented labeled data for the full linear-evaluation protocol: ``image`` uint8 (N, 3, S, S), one
    random resized crop (scale [0.08, 1] as in the reference) + flip per row, ``label`` int64, ``valid``.

    Same columns as :func:`eval_dataset`, so :func:`iter_eval_batches` reads both.
    """
    _check_labeled(path, "linear-evaluation data")
    ds = _read(data_cfg, path, "data.path", shuffle_seed=int(seed))
    s = data_cfg.image_size
    return ds.map_batches(
        batches.labeled_batch, batch_format="pyarrow", batch_size=_rows_per_batch(s, 1), num_cpus=_task_cpus(data_cfg),
        fn_kwargs={"image_size": s, "min_scale": min_scale, "max_pixels": data_cfg.max_pixels,
                   "on_bad_image": data_cfg.on_bad_image, "seed": int(seed)},
    )


def dataset_info(path: str) -> dict[str, Any]:
    """Size and labels of a dataset: ``num_rows``, ``num_shards``, ``class_names``, ``num_classes``,
    ``counts`` (rows per label, "-1" = unlabeled) and ``labeled`` (every row has a label).

    From ``_simsiam.json`` when present, else by reading the shards' label columns.
    """
    try:
        meta = read_metadata(path)
        counts = {str(k): int(v) for k, v in meta.get("counts", {}).items()}
        class_names = list(meta.get("class_names", []))
        num_rows = int(meta["num_rows"])
        num_shards = len(meta.get("shards", [])) or len(validate_shards(path, "data.path").shards)
    except DataError as e:
        if "no " + METADATA_FILE not in str(e):
            raise
        found = validate_shards(path, "data.path")
        counts = {}
        for shard in found.shards:
            labels = pq.read_table(shard, columns=["label"]).column("label").fill_null(-1).to_numpy()
            for v, c in zip(*np.unique(labels, return_counts=True), strict=True):
                counts[str(int(v))] = counts.get(str(int(v)), 0) + int(c)
        class_names, num_rows, num_shards = [], found.num_rows, len(found.shards)
    top = max((int(k) for k in counts), default=-1)
    return {
        "num_rows": num_rows,
        "num_shards": num_shards,
        "class_names": class_names,
        "num_classes": len(class_names) or top + 1,
        "counts": counts,
        "labeled": num_rows > 0 and counts.get("-1", 0) == 0,
    }


def iter_train_batches(shard: Any, data_cfg: DataConfig, batch_size: int, seed: int, epoch: int,
                       device: torch.device | str | None = None, decode: str = "cpu"
                       ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """One epoch of (view1, view2, n_skipped) uint8 batches from a train worker's shard, on ``device``.

    ``shard`` is what ``ray.train.get_dataset_shard`` returns (a DataIterator) or a Dataset. Bad rows
    skipped under ``data.on_bad_image: skip`` are removed and counted in ``n_skipped``, so a batch can
    hold fewer than ``batch_size`` rows - even none. Every underlying batch is yielded, so all workers
    of a streaming split see the same number of steps (DDP needs that). ``decode`` must match the
    dataset's (:func:`train_dataset`). For a CUDA device, batches are pinned on Ray's prefetch threads
    and copied without blocking.
    """
    device = torch.device(device if device is not None else "cpu")
    if decode == "gpu":
        from simsiam.data.device_decode import iter_views

        yield from iter_views(shard, data_cfg, batch_size, seed, epoch, device)
        return
    buffer = data_cfg.shuffle_buffer or None
    for batch in plain_data_errors(shard.iter_torch_batches(
        batch_size=batch_size, drop_last=True, local_shuffle_buffer_size=buffer,
        local_shuffle_seed=(seed + epoch) if buffer else None, prefetch_batches=data_cfg.prefetch_batches,
        device=device, pin_memory=device.type == "cuda",
    )):
        v1, v2, valid = batch["view1"], batch["view2"], batch["valid"]
        # Under on_bad_image "error" every row is valid (a bad one raised in the map), so the count, a
        # device-to-host sync per step on a GPU, is only taken where rows can be skipped.
        n_bad = int((~valid).sum()) if data_cfg.on_bad_image == "skip" else 0
        if n_bad:
            v1, v2 = v1[valid], v2[valid]
        yield v1, v2, n_bad


def iter_eval_batches(shard_or_ds: Any, batch_size: int, device: torch.device | str | None = None,
                      stats: dict | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images uint8 (N, 3, S, S), labels int64) batches of an eval dataset or shard, in order, no drop.

    Rows skipped as bad are removed; pass a dict as ``stats`` to have ``stats["skipped"]`` counted.
    """
    for batch in plain_data_errors(shard_or_ds.iter_torch_batches(batch_size=batch_size, drop_last=False,
                                                              device=device if device is not None else "cpu")):
        images, labels, valid = batch["image"], batch["label"], batch["valid"]
        n_bad = int((~valid).sum())
        if n_bad:
            images, labels = images[valid], labels[valid]
            if stats is not None:
                stats["skipped"] = stats.get("skipped", 0) + n_bad
        if images.shape[0]:
            yield images, labels
