"""A dataset given as a shard list (*.shards.txt / *.shards.json) instead of a directory: listing,
validation, metadata fallback and the clear errors. Fast: no Ray (the Ray Data pipelines on a list
are exercised in tests/test_retrain.py, which has a Ray session)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from simsiam import config as C
from simsiam.data import resolve_paths
from simsiam.data.pipeline import dataset_info
from simsiam.data.schema import DataError, list_shards, read_metadata, validate_shards


@pytest.fixture(scope="module")
def digits(digits_cache) -> tuple[Path, Path]:
    train, test = resolve_paths(C.load("sample", {"data.cache_dir": digits_cache, "data.path": "builtin:digits"}).data)
    return Path(train), Path(test)


def test_txt_list_keeps_order_resolves_relative_paths_and_skips_comments(digits, tmp_path):
    train, test = digits
    shards = list_shards(str(train))
    lst = tmp_path / "pick.shards.txt"
    rel = os.path.relpath(shards[3], tmp_path)
    lst.write_text(f"# picked by hand\n{shards[5]}\n\n  {rel}  \n{list_shards(str(test))[0]}\n")
    assert list_shards(str(lst)) == [shards[5], shards[3], list_shards(str(test))[0]]


def test_json_list_and_the_pipeline_metadata_fallback(digits, tmp_path):
    train, _ = digits
    shards = list_shards(str(train))[:4]
    lst = tmp_path / "sub" / "train.shards.json"
    lst.parent.mkdir()
    lst.write_text(json.dumps({"shards": shards, "note": "extra keys are ignored"}))
    found = validate_shards(str(lst))
    assert found.shards == shards
    # A list has no _simsiam.json: dataset_info counts rows and labels from the shards themselves.
    with pytest.raises(DataError, match="no _simsiam.json"):
        read_metadata(str(lst))
    info = dataset_info(str(lst))
    assert info["num_rows"] == found.num_rows and info["num_shards"] == 4
    assert sum(info["counts"].values()) == found.num_rows and info["labeled"]
    meta = read_metadata(str(train))
    want = sum(s["rows"] for s in meta["shards"] if str(train / s["file"]) in shards)
    assert found.num_rows == want


def test_a_list_works_as_data_path_and_eval_path(digits, tmp_path, digits_cache):
    train, test = digits
    a, b = tmp_path / "a.shards.txt", tmp_path / "b.shards.json"
    a.write_text("\n".join(list_shards(str(train))[:2]))
    b.write_text(json.dumps({"shards": list_shards(str(test))}))
    cfg = C.load("sample", {"data.cache_dir": digits_cache, "data.path": str(a), "data.eval_path": str(b)})
    assert resolve_paths(cfg.data) == (str(a), str(b))


@pytest.mark.parametrize("name, text, match", [
    ("empty.shards.txt", "# nothing\n\n", "the shard list is empty"),
    ("bad.shards.json", "{not json", "not valid JSON"),
    ("shape.shards.json", '["a.parquet"]', 'expected {"shards"'),
    ("missing.shards.txt", "part-99999.parquet\n", r"missing.shards.txt:1: shard .*part-99999.parquet does not exist"),
    ("nested.shards.txt", "other.shards.txt\n", "lists do not nest"),
])
def test_bad_lists_name_the_list_and_the_entry(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=match):
        list_shards(str(tmp_path / name), "data.path")


def test_a_shard_listed_twice_is_refused(digits, tmp_path):
    train, _ = digits
    s = list_shards(str(train))[0]
    lst = tmp_path / "dup.shards.txt"
    lst.write_text(f"{s}\n{os.path.relpath(s, tmp_path)}\n")
    with pytest.raises(DataError, match=r"dup.shards.txt:2: .* is listed twice"):
        list_shards(str(lst))


def test_directories_and_single_files_behave_as_before(digits):
    train, _ = digits
    shards = list_shards(str(train))
    assert shards == sorted(shards) and len(shards) > 1
    assert list_shards(shards[0]) == [shards[0]]
