"""Checks of a run's data before any Ray process starts: bad data is found once, early, in one line.

:func:`preflight` resolves ``data.path`` / ``data.eval_path`` and reads only Parquet footers and the
small ``label``/``id`` columns (pyarrow, no Ray, no torch):

- a path that does not exist, a folder without shards, an unfinished conversion (from
  :func:`simsiam.data.schema.list_shards`);
- a file that is not Parquet, a wrong schema, shards that disagree, zero rows
  (:func:`simsiam.data.schema.validate_shards`);
- an unlabeled row in the evaluation set (fails, naming shard and row id; under
  ``data.on_bad_image: skip`` a warning with the count, the rows are skipped and counted);
- duplicate ids (a warning: the format says ids are unique, and errors and skip lists name rows by id).

Row ids and labels are read for local datasets; on remote storage (s3://, gs://) reading every
shard's columns before the run would cost a pass over the store, so there the label counts come from
``_simsiam.json`` and duplicate ids are not checked.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from simsiam.config import DataConfig
from simsiam.data.schema import (
    DataError,
    ShardSet,
    describe_duplicates,
    duplicate_ids,
    filesystem,
    is_uri,
    read_metadata,
    validate_shards,
)

# Duplicate-id check: at most this many rows are read (ids of ImageNet-1k fit easily).
MAX_ID_ROWS = 20_000_000


@dataclass
class Preflight:
    """What the checks found: resolved paths, sizes, and warnings to show the user."""

    train_path: str
    eval_path: str
    train_rows: int
    eval_rows: int
    train_shards: int
    warnings: list[str] = field(default_factory=list)


def _read_columns(shard: str, columns: list[str]):
    fs, inner = filesystem(shard)
    with fs.open_input_file(inner) as f:
        return pq.read_table(f, columns=columns)


def _unlabeled(found: ShardSet, path: str) -> tuple[int, str | None]:
    """(number of rows with label -1, 'shard, row id' of the first) - from metadata on remote storage."""
    if is_uri(path):
        try:
            counts = read_metadata(path).get("counts") or {}
        except DataError:
            return 0, None
        return int(counts.get("-1", 0)), None
    n, first = 0, None
    for shard in found.shards:
        t = _read_columns(shard, ["label", "id"])
        labels = t.column("label").fill_null(-1).to_numpy()
        bad = np.flatnonzero(labels < 0)
        if bad.size and first is None:
            first = f"{os.path.basename(shard)}, row id {t.column('id')[int(bad[0])].as_py()!r}"
        n += int(bad.size)
    return n, first


def preflight(data_cfg: DataConfig, labeled_eval: bool = True) -> Preflight:
    """Resolve and check the run's datasets; raise :class:`DataError` (or ConfigError) naming what is wrong.

    ``labeled_eval``: the evaluation set must be labeled (kNN monitor, linear evaluation)."""
    from simsiam.data import resolve_paths

    train_path, eval_path = resolve_paths(data_cfg)
    train = validate_shards(train_path, "data.path")
    held = validate_shards(eval_path, "data.eval_path") if eval_path != train_path else train
    warnings = []
    if labeled_eval:
        n, first = _unlabeled(held, eval_path)
        if n and data_cfg.on_bad_image == "skip":
            warnings.append(f"data.eval_path: {n} of {held.num_rows} rows are unlabeled (label -1); they are "
                            "skipped and counted (data.on_bad_image=skip)")
        elif n:
            where = f" (first: {first})" if first else ""
            raise DataError(f"data.eval_path: {eval_path} has {n} unlabeled row(s) (label -1){where}; kNN and "
                            "linear evaluation need every row labeled: fix the labels, point data.eval_path at a "
                            "labeled set, or set data.on_bad_image=skip to skip them")
    sets = [("data.path", train_path, train)] + ([("data.eval_path", eval_path, held)] if held is not train else [])
    for what, path, found in sets:
        if is_uri(path) or found.num_rows > MAX_ID_ROWS:
            continue
        n, where = duplicate_ids(found.shards)
        if n:
            warnings.append(f"{what}: {describe_duplicates(n, where)}; the schema requires unique ids (errors "
                            "and skip lists name rows by id)")
    return Preflight(train_path, eval_path, train.num_rows, held.num_rows, len(train.shards), warnings)
