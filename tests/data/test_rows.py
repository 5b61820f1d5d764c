"""Columnar rows: read like a list of dicts, cost about the text they hold."""
import csv
import tracemalloc

import numpy as np
import pytest
import torch

from moeclip.data.dataset import CaptionDataset, iter_table
from moeclip.data.rows import Rows, StringColumn


def test_column_round_trip_unicode_and_empty():
    values = ["a cat", "", "café ☕", "x" * 5000, "line\nbreak"]
    col = StringColumn.from_strings(values)
    assert list(col) == values and len(col) == 5 and col[-1] == values[-1]
    assert list(col[1:4]) == values[1:4] and list(col.take(np.array([4, 0]))) == [values[4], values[0]]
    with pytest.raises(IndexError):
        col[5]


def test_rows_read_like_dicts():
    dicts = [{"filepath": "a.png", "title": "one", "color": "red"},
             {"filepath": "b.png", "title": "two"}]  # a missing key reads as ''
    rows = Rows.from_dicts(dicts)
    assert rows.names == ["filepath", "title", "color"]
    assert rows[1] == {"filepath": "b.png", "title": "two", "color": ""}
    assert list(rows) == [rows[0], rows[1]] and len(rows[:1]) == 1 and rows[:1][0]["color"] == "red"
    assert "color" in rows[0]


def test_stream_with_changing_keys_is_an_error():
    with pytest.raises(ValueError, match="differ from the first row"):
        Rows.from_dicts(iter([{"a": "1"}, {"b": "2"}]))


def _table(path, n):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title", "shape", "color"])
        for i in range(n):
            w.writerow([f"images/{i:07d}.png", f"a photo of a {i % 97} red square on grass", "square", "red"])


def test_columnar_rows_cost_a_third_of_dicts(tmp_path):
    """Rows hold the CSV's text and two arrays per column; the list of dicts CaptionDataset held before (the
    table's columns plus `_path` and `_caption`) was ~900 bytes of objects per row."""
    _table(tmp_path / "t.csv", 20000)
    tracemalloc.start()
    dicts = [{**r, "_path": str(tmp_path / r["filepath"]), "_caption": r["title"].strip()}
             for r in iter_table(tmp_path / "t.csv")]
    dict_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del dicts
    ds = CaptionDataset(tmp_path / "t.csv")
    rows_bytes = ds.rows.nbytes + ds.caption_ids.nbytes + ds.image_ids.nbytes
    assert len(ds) == 20000 and ds.rows[123]["_caption"] == "a photo of a 26 red square on grass"
    assert rows_bytes < dict_bytes / 2.5, (rows_bytes, dict_bytes)


def test_workers_read_the_same_rows(tmp_path):
    _table(tmp_path / "t.csv", 50)
    ds = CaptionDataset(tmp_path / "t.csv")  # images are missing: every item is a counted skip
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork")
    items = list(loader)
    assert [it["caption"] for it in items] == ds.captions
    assert all(not it["ok"] and it["where"].startswith(f"{tmp_path / 't.csv'}:") for it in items)
