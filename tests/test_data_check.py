"""Finding bad data before training: repeated ids (the reusable check and `simsiam data inspect`), and
`simsiam data inspect --full`, which decodes every row and lists each bad one by shard and row."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from simsiam.data.cli import main as data_main
from simsiam.data.inspect import check_rows
from simsiam.data.schema import SCHEMA, DataError, check_unique_ids, duplicate_ids


def write_shard(path: Path, rows: list[dict]) -> None:
    cols = {name: [r.get(name) for r in rows] for name in SCHEMA.names}
    pq.write_table(pa.Table.from_pydict(cols, schema=SCHEMA), path, row_group_size=4)


def encoded(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def good_rows(n: int, prefix: str = "good", seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"image": encoded(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), "PNG"), "label": i % 2,
             "id": f"{prefix}{i}"} for i in range(n)]


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("clean")
    rows = good_rows(10)
    write_shard(d / "part-00000.parquet", rows[:6])
    write_shard(d / "part-00001.parquet", rows[6:])
    return str(d)


@pytest.fixture(scope="module")
def bad_set(tmp_path_factory) -> str:
    """Good rows around one of each kind of bad row, at known positions in two shards."""
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(1)
    jpeg = encoded(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG")
    good = good_rows(9)
    write_shard(d / "part-00000.parquet", good[:3] + [{"image": b"GIF89a not really", "label": 0, "id": "notimage"}]
                + good[3:5])
    write_shard(d / "part-00001.parquet", good[5:7] + [
        {"image": jpeg[: len(jpeg) // 2], "label": 1, "id": "truncated"},                       # row 2
        {"image": encoded(np.zeros((1100, 1000, 3), np.uint8), "PNG"), "label": 1, "id": "bomb"},  # row 3
        {"image": b"\x00" * 10, "label": 0, "id": "rawshort", "height": 4, "width": 4, "channels": 3},  # row 4
    ] + good[7:])
    return str(d)


def test_duplicate_ids_are_found_by_shard_and_row(tmp_path, clean_set):
    check_unique_ids(clean_set)  # no error
    assert duplicate_ids(sorted(str(p) for p in Path(clean_set).glob("*.parquet"))) == (0, {})
    rows = good_rows(5)
    write_shard(tmp_path / "part-00000.parquet", rows)
    write_shard(tmp_path / "part-00001.parquet", good_rows(2, seed=3) + [rows[3]])  # good0, good1, good3 again
    count, where = duplicate_ids(sorted(str(p) for p in tmp_path.glob("*.parquet")))
    assert count == 3
    assert [(Path(s).name, r) for s, r in where["good3"]] == [("part-00000.parquet", 3), ("part-00001.parquet", 2)]
    with pytest.raises(DataError) as err:
        check_unique_ids(str(tmp_path), "data.path")
    msg = str(err.value)
    assert msg.startswith(f"data.path: {tmp_path}: 3 ids occur more than once: 'good0' (part-00000.parquet row 0, "
                          "part-00001.parquet row 0)")
    assert "'good3' (part-00000.parquet row 3, part-00001.parquet row 2)" in msg and "unique ids" in msg


def test_inspect_says_ids_repeat_and_exits_1(tmp_path, capsys):
    rows = good_rows(4)
    write_shard(tmp_path / "part-00000.parquet", rows + [rows[1]])
    assert data_main(["inspect", str(tmp_path), "--samples", "0", "--pairs", "0"]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM: 1 id occurs more than once: 'good1' (part-00000.parquet row 1, part-00000.parquet row 4)" in out


def test_inspect_full_lists_every_bad_row_and_exit_code_says_whether_clean(clean_set, bad_set, capsys):
    # Without --full only the header sample is read: the bad rows go unnoticed (exit 0), as the issue found.
    assert data_main(["inspect", bad_set, "--samples", "0", "--pairs", "0"]) == 0
    capsys.readouterr()
    assert data_main(["inspect", clean_set, "--full", "--samples", "0", "--pairs", "0"]) == 0
    assert "every row decodes: 10 rows checked" in capsys.readouterr().out

    args = ["inspect", bad_set, "--full", "--samples", "0", "--pairs", "0", "--set", "data.max_pixels=1000000"]
    assert data_main(args) == 1
    out = capsys.readouterr().out
    assert "PROBLEM: 4 of 13 rows cannot be decoded" in out
    s0, s1 = f"{bad_set}/part-00000.parquet", f"{bad_set}/part-00001.parquet"
    expected = [f"{s0}: row 3 id='notimage': corrupt or not an image",
                f"{s1}: row 2 id='truncated': truncated",
                f"{s1}: row 3 id='bomb': image is 1000x1100 = 1100000 pixels, over data.max_pixels = 1000000",
                f"{s1}: row 4 id='rawshort': raw image has 10 bytes"]
    listed = [ln.strip() for ln in out.splitlines() if "row " in ln and "id=" in ln]
    assert len(listed) == 4 and all(ln.startswith(e) for ln, e in zip(listed, expected, strict=True)), listed

    # Two worker processes, JSON out: the same rows; the pixel bomb passes under the default limit.
    assert data_main(["inspect", bad_set, "--full", "--workers", "2", "--json", "--samples", "0", "--pairs", "0"]) == 1
    summary = json.loads(capsys.readouterr().out)
    bad = summary["row_check"]["bad"]
    assert summary["clean"] is False and summary["row_check"]["rows"] == 13
    assert [(Path(b["shard"]).name, b["row"], b["id"]) for b in bad] == [
        ("part-00000.parquet", 3, "notimage"), ("part-00001.parquet", 2, "truncated"),
        ("part-00001.parquet", 4, "rawshort")]


def test_check_rows_streams_in_batches(bad_set):
    check = check_rows(bad_set, max_pixels=1_000_000, workers=1)
    assert (check.rows, check.bad_count, check.clean) == (13, 4, False)
    assert {b.id for b in check.bad} == {"notimage", "truncated", "bomb", "rawshort"}
