"""ShareGPT4V caption JSON as training and evaluation data: rows, skips, format detection, and every place
that opens a data file (evaluation, `moeclip eval`, expert analysis, search indexing, training batches)."""
import json

import pytest
from PIL import Image

import moeclip
from moeclip.cli import main
from moeclip.data.dataset import Collate, DataError
from moeclip.data.formats import data_format, open_dataset
from moeclip.data.karpathy import is_karpathy, read_karpathy
from moeclip.data.sharegpt4v import ShareGPT4VDataset, is_sharegpt4v, read_sharegpt4v
from moeclip.eval.evaluate import evaluate

COLOURS = ["red", "green", "blue", "yellow", "white", "black"]
RGB = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20),
       "white": (250, 250, 250), "black": (5, 5, 5)}
LONG_TAIL = " ".join(f"detail{i}" for i in range(80))  # pushes a caption well past 77 tokens


def _turns(caption):
    return [{"from": "human", "value": "<image>\nDescribe the image in detail."},
            {"from": "gpt", "value": caption}, {"from": "human", "value": "More?"},
            {"from": "gpt", "value": "a second answer, not the caption"}]


def _sharegpt4v(tmp_path, image_dir="images"):
    """Six good entries (one with a caption over 77 tokens) and five bad ones, images under tmp/images/sub."""
    (tmp_path / image_dir / "sub").mkdir(parents=True, exist_ok=True)
    entries = []
    for i, c in enumerate(COLOURS):
        Image.new("RGB", (32, 32), RGB[c]).save(tmp_path / image_dir / "sub" / f"{c}.png")
        caption = f"A plain square filled with {c} colour. " + (LONG_TAIL if i == 0 else "")
        entries.append({"id": f"s{i}", "image": f"sub/{c}.png", "conversations": _turns(caption)})
    entries += ["not an entry",                                                          # [6]
                {"id": "x", "conversations": _turns("no image key")},                   # [7]
                {"id": "y", "image": "sub/red.png", "conversations": [{"from": "human", "value": "hi"}]},  # [8]
                {"id": "z", "image": "sub/red.png", "conversations": _turns("   ")},    # [9]
                {"id": "w", "image": "", "conversations": _turns("empty path")}]        # [10]
    path = tmp_path / "share-captioner.json"
    path.write_text(json.dumps(entries, indent=1))
    return path


def test_rows_captions_and_skips(tmp_path):
    path = _sharegpt4v(tmp_path)
    rows = read_sharegpt4v(path, image_root=tmp_path / "images")
    assert len(rows) == 6 and [r["id"] for r in rows] == [f"s{i}" for i in range(6)]
    assert rows[1]["_caption"] == "A plain square filled with green colour."  # the first gpt turn, stripped
    assert rows[1]["_path"] == str(tmp_path / "images" / "sub" / "green.png")
    ds = ShareGPT4VDataset(path, image_root=tmp_path / "images")
    assert dict(ds.skips.counts) == {"entry is not an object": 1, "no image path": 2, "no gpt turn": 1,
                                     "empty caption": 1}
    assert ds.skips.examples[0] == f"{path}:[6]: entry is not an object"
    assert f"{path}:[8]: no gpt turn" in ds.skips.examples
    assert len(ds) == 6 and ds.captions[0].endswith("detail79")  # a long caption is kept whole
    assert ds.column("id")[2] == "s2" and ds.caption_ids.tolist() == list(range(6))
    assert ds.image_ids.tolist() == list(range(6))
    assert ds[0]["ok"] and ds[0]["image"].size == (32, 32)
    with pytest.raises(DataError, match="no column 'colour'"):
        ds.column("colour")


def test_image_root_defaults_to_the_json_folder(tmp_path):
    path = _sharegpt4v(tmp_path, image_dir=".")
    ds = open_dataset(path)
    assert ds.rows[0]["_path"] == str(tmp_path / "sub" / "red.png") and ds[0]["ok"]
    elsewhere = open_dataset(path, image_root=tmp_path / "nowhere")
    assert not elsewhere[0]["ok"] and elsewhere[0]["reason"] == "missing file"


def test_format_is_detected_from_content(tmp_path, corpus):
    path = _sharegpt4v(tmp_path)
    named_like_coco = tmp_path / "dataset_coco.json"
    named_like_coco.write_text(" \n" + path.read_text())  # leading whitespace, a misleading name
    assert is_sharegpt4v(named_like_coco) and not is_karpathy(named_like_coco)
    assert data_format(named_like_coco) == "sharegpt4v" and data_format(corpus["val"]) == "table"
    karpathy = tmp_path / "k.json"
    karpathy.write_text(json.dumps({"images": [{"filename": "sub/red.png", "split": "test",
                                                "sentences": [{"raw": "red"}]}]}))
    assert data_format(karpathy) == "karpathy" and len(read_karpathy(karpathy, image_root=tmp_path / "images")) == 1


def test_files_that_are_not_such_a_list_fail_in_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"annotations": []}')
    with pytest.raises(DataError, match=r"bad.json: top level is a dict, not a list; expected ShareGPT4V"):
        read_sharegpt4v(bad)
    with pytest.raises(DataError, match=r"bad.json: no 'images' list; .* or ShareGPT4V JSON"):
        open_dataset(bad)  # an object routes to the Karpathy reader, whose message names both formats
    bad.write_text('[{"image": "a.png"}, 3]')
    with pytest.raises(DataError, match=r"bad.json: no usable entries \(skipped 2 samples"):
        open_dataset(bad)
    bad.write_text("[]")
    with pytest.raises(DataError, match="bad.json: no usable entries .the list is empty"):
        open_dataset(bad)
    bad.write_text('[{"image": ')
    with pytest.raises(DataError, match="bad.json: not a JSON file"):
        read_sharegpt4v(bad)
    with pytest.raises(DataError, match="missing.json: data file not found"):
        open_dataset(tmp_path / "missing.json")


def test_evaluation_and_cli(tmp_path, micro_dir, capsys):
    path = _sharegpt4v(tmp_path)
    model, pre, tok = moeclip.load(micro_dir)
    m = evaluate(model, pre, tok, path, image_root=tmp_path / "images", progress=False, runtime=_cpu())
    assert m["num_images"] == 6 and m["num_captions"] == 6
    assert m["skipped"] == {"empty caption": 1, "entry is not an object": 1, "no gpt turn": 1, "no image path": 2}
    csv = tmp_path / "same.csv"
    rows = read_sharegpt4v(path, image_root=tmp_path / "images")
    csv.write_text("filepath,title\n" + "".join(f"{r['_path']},\"{r['_caption']}\"\n" for r in rows))
    m_csv = evaluate(model, pre, tok, csv, progress=False, runtime=_cpu())
    for k in ("image_to_text_R@1", "text_to_image_R@1", "mean_R@1"):
        assert m[k] == m_csv[k], k
    assert main(["eval", "--model", str(micro_dir), "--data", str(path), "--image-root", str(tmp_path / "images"),
                 "--device", "cpu"]) == 0
    assert "| images / captions | 6 / 6 |" in capsys.readouterr().out


def test_long_captions_reach_a_stretched_tokenizer(tmp_path, micro_dir):
    from moeclip.model.context import stretch_context
    from moeclip.model.factory import model_tokenizer
    path = _sharegpt4v(tmp_path)
    model, pre, tok = moeclip.load(micro_dir)
    ds = open_dataset(path, pre, image_root=tmp_path / "images")
    stretch_context(model, 120)
    batch = Collate(model_tokenizer(model))([ds[0], ds[1], ds[2]])  # what a training step receives
    assert batch["image"].shape[0] == 3 and batch["text"].shape == (3, 120)
    assert int((batch["text"][0] != 0).sum()) > 77 and int((batch["text"][1] != 0).sum()) < 20


def test_expert_analysis_and_search_index_open_it(tmp_path, micro_dir):
    from moeclip.analysis import analyse_experts
    from moeclip.search.sources import list_images
    path = _sharegpt4v(tmp_path)
    model, pre, tok = moeclip.load(micro_dir)
    moeclip.upcycle(model, None, num_experts=2, top_k=1)
    res = analyse_experts(model, pre, tok, path, progress=False, runtime=_cpu(), image_root=tmp_path / "images")
    assert res["layers"] and all(sum(layer["load"]) > 0.99 for layer in res["layers"])
    assert list_images(path, image_root=tmp_path / "images") == [
        str(tmp_path / "images" / "sub" / f"{c}.png") for c in COLOURS]
    out = tmp_path / "experts"
    assert main(["experts", "--model", str(micro_dir), "--data", str(path), "--image-root",
                 str(tmp_path / "images"), "--out", str(out), "--device", "cpu"]) == 2  # dense: refused, clearly
    moe = moeclip.save_model_dir(model, tmp_path / "moe")
    assert main(["experts", "--model", str(moe), "--data", str(path), "--image-root", str(tmp_path / "images"),
                 "--out", str(out), "--device", "cpu"]) == 0
    assert main(["index", "--model", str(moe), "--images", str(path), "--image-root", str(tmp_path / "images"),
                 "--out", str(tmp_path / "index"), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "index" / "index.json").read_text())["count"] == 6


def _cpu():
    from moeclip.runtime import Runtime
    return Runtime.local("cpu")
