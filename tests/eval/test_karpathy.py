"""Karpathy-split caption JSON (COCO / Flickr30k) read as rows, evaluated like the equivalent CSV."""
import json
import shutil

import pytest

from moeclip import load
from moeclip.cli import main
from moeclip.data.dataset import CaptionDataset, DataError
from moeclip.data.karpathy import KarpathyDataset, read_karpathy
from moeclip.eval.evaluate import evaluate


def _karpathy(corpus, tmp_path, coco_style=True):
    """The first 12 val images as a Karpathy JSON: 8 test (two captions each), 4 val."""
    rows = CaptionDataset(corpus["val"]).rows[:12]
    (tmp_path / "imgs" / "val2014").mkdir(parents=True, exist_ok=True)
    images = []
    for i, r in enumerate(rows):
        name = f"im{i}.png"
        shutil.copy(r["_path"], tmp_path / "imgs" / "val2014" / name)
        entry = {"filename": name, "imgid": i, "split": "test" if i < 8 else "val",
                 "sentences": [{"raw": r["_caption"], "tokens": r["_caption"].split()},
                               {"tokens": ["picture", "number", str(i)]}]}  # old files: tokens only
        if coco_style:
            entry["filepath"] = "val2014"
        images.append(entry)
    images[0]["sentences"].append({"raw": "  ", "tokens": []})  # empty: skipped and counted
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def test_rows_per_split_and_image_root(corpus, tmp_path):
    path = _karpathy(corpus, tmp_path)
    rows = read_karpathy(path, "test", image_root=tmp_path / "imgs")
    assert len(rows) == 16 and rows[1]["_caption"] == "picture number 0"
    assert rows[0]["_path"] == str(tmp_path / "imgs" / "val2014" / "im0.png")
    assert len(read_karpathy(path, "val")) == 8 and len(read_karpathy(path, "all")) == 24
    ds = KarpathyDataset(path, split="test", image_root=tmp_path / "imgs")
    assert ds.skips.counts == {"empty caption": 1} and len(ds) == 16
    assert ds[0]["ok"] and int(ds.image_ids.max()) == 7
    ds_default_root = KarpathyDataset(path)  # default root = the JSON's folder: files are not there
    assert not ds_default_root[0]["ok"] and ds_default_root[0]["reason"] == "missing file"


def test_flickr_style_without_filepath(corpus, tmp_path):
    path = _karpathy(corpus, tmp_path, coco_style=False)
    rows = read_karpathy(path, image_root=tmp_path / "imgs" / "val2014")
    assert rows[0]["_path"] == str(tmp_path / "imgs" / "val2014" / "im0.png")


def test_errors_name_the_file_and_what_to_do(corpus, tmp_path):
    path = _karpathy(corpus, tmp_path)
    with pytest.raises(DataError, match=r"no captions in split 'train' \(found test \(8 images\), val"):
        read_karpathy(path, "train")
    bad = tmp_path / "bad.json"
    bad.write_text('{"annotations": []}')
    with pytest.raises(DataError, match="bad.json: no 'images' list"):
        read_karpathy(bad)
    bad.write_text('{"images": [{"split": "test"}]}')
    with pytest.raises(DataError, match=r"images\[0\] has no 'filename'"):
        read_karpathy(bad)
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not a JSON file"):
        read_karpathy(bad)


def test_evaluate_equals_the_equivalent_csv(corpus, tmp_path, micro_dir, capsys):
    path = _karpathy(corpus, tmp_path)
    model, pre, tok = load(micro_dir)
    m_json = evaluate(model, pre, tok, path, image_root=tmp_path / "imgs", progress=False)
    rows = read_karpathy(path, image_root=tmp_path / "imgs")
    csv = tmp_path / "same.csv"
    csv.write_text("filepath,title\n" + "".join(f"{r['_path']},{r['_caption']}\n" for r in rows))
    m_csv = evaluate(model, pre, tok, csv, progress=False)
    assert m_json["num_images"] == 8 and m_json["num_captions"] == 16 and m_json["skipped"] == {"empty caption": 1}
    for k in ("image_to_text_R@1", "text_to_image_R@1", "text_to_image_R@5", "mean_R@1"):
        assert m_json[k] == m_csv[k], k
    assert main(["eval", "--model", str(micro_dir), "--data", str(path), "--split", "val",
                 "--image-root", str(tmp_path / "imgs"), "--device", "cpu"]) == 0
    assert "| images / captions | 4 / 8 |" in capsys.readouterr().out
