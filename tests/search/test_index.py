import json

import numpy as np
import pytest

from moeclip import load
from moeclip.cli import main
from moeclip.data.dataset import load_image
from moeclip.search import build_index, embed_query, list_images, model_reference, open_index, search


@pytest.fixture(scope="module")
def micro(micro_dir):
    return load(micro_dir)


def _build(micro, micro_dir, images, out, **kw):
    model, preprocess, _ = micro
    return build_index(model, preprocess, images, out, model_reference(micro_dir), progress=False, **kw)


def _snapshot(out):
    meta = json.loads((out / "index.json").read_text())
    emb = np.load(out / "embeddings.npy")[:meta["count"]]
    return emb, (out / "paths.jsonl").read_bytes(), meta["skipped"], meta["count"]


def test_folder_listing_is_recursive_and_sorted(photo_dir):
    paths = list_images(photo_dir)
    assert len(paths) == 10 and paths == sorted(paths)  # 9 images + broken.jpg; txt and hidden files ignored
    assert any("deeper" in p for p in paths) and not any(p.endswith((".txt", ".hidden.png")) for p in paths)


def test_csv_listing_resolves_relative_paths_once(photo_dir, tmp_path):
    table = photo_dir / "list.csv"
    table.write_text("filepath,title\nimg0.png,a\nimg0.png,b\nnested/img4.jpg,c\n")
    assert list_images(table) == [str(photo_dir / "img0.png"), str(photo_dir / "nested" / "img4.jpg")]


def test_index_embeds_readable_images_and_lists_the_skipped(micro, micro_dir, photo_dir, tmp_path):
    info = _build(micro, micro_dir, photo_dir, tmp_path / "idx", batch_size=4)
    assert info["complete"] and info["count"] == 9 and info["num_sources"] == 10
    assert info["skipped"] == [{"path": str(photo_dir / "broken.jpg"), "reason": "not an image"}]
    index = open_index(tmp_path / "idx")
    paths = index.paths(range(index.count))
    assert str(photo_dir / "broken.jpg") not in paths.values() and len(paths) == 9
    assert index.embeddings.dtype == np.float16
    model, preprocess, _ = micro
    for row in (0, 5, 8):  # every row is the fp16 embedding of its manifest path
        want = model.encode_image(preprocess(load_image(paths[row]))[None], normalize=True)[0]
        np.testing.assert_allclose(index.embeddings[row].astype(np.float32), want.detach().numpy(), atol=2e-3)
    query = embed_query(*micro, image=paths[5])
    hits = search(index, query, k=3)
    assert hits[0]["path"] == paths[5] and hits[0]["score"] == pytest.approx(1.0, abs=5e-3)
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]


def test_resume_after_a_kill_gives_the_identical_index(micro, micro_dir, photo_dir, tmp_path):
    ref = tmp_path / "ref"
    _build(micro, micro_dir, photo_dir, ref, batch_size=2, commit_every=1)

    out = tmp_path / "resumed"
    part = _build(micro, micro_dir, photo_dir, out, batch_size=2, commit_every=1, limit=4)
    assert not part["complete"] and part["next"] == 4 and not (out / "index.json").exists()
    committed = (out / "progress.json").read_bytes()
    _build(micro, micro_dir, photo_dir, out, batch_size=2, commit_every=1, limit=4)  # work past that commit...
    (out / "progress.json").write_bytes(committed)  # ...then "killed" before it was committed
    with open(out / "paths.jsonl", "ab") as f:
        f.write(b'"half-written line')  # a torn manifest write
    done = _build(micro, micro_dir, photo_dir, out, batch_size=2, commit_every=1)
    assert done["complete"] and done["embedded_this_run"] == 6  # 10 sources - 4 committed (broken.jpg among them)
    a, b = _snapshot(ref), _snapshot(out)
    assert np.array_equal(a[0], b[0]) and a[1:] == b[1:]

    again = _build(micro, micro_dir, photo_dir, out, batch_size=2)  # a complete index: nothing to do
    assert again["embedded_this_run"] == 0 and again["count"] == 9


def test_refuses_to_mix_models_or_folders(micro, micro_dir, photo_dir, tmp_path):
    model, preprocess, _ = micro
    _build(micro, micro_dir, photo_dir, tmp_path / "idx", limit=2)
    with pytest.raises(ValueError, match="unfinished index"):
        build_index(model, preprocess, photo_dir, tmp_path / "idx", "another-model", progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.txt").write_text("x")
    with pytest.raises(ValueError, match="not a moeclip index"):
        _build(micro, micro_dir, photo_dir, tmp_path / "other")
    with pytest.raises(ValueError, match="unfinished index"):
        open_index(tmp_path / "idx")


def test_cli_index_then_search(micro_dir, photo_dir, tmp_path, capsys):
    out = tmp_path / "cli_idx"
    assert main(["index", "--model", str(micro_dir), "--images", str(photo_dir), "--out", str(out),
                 "--batch-size", "3", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "9 images embedded" in printed and "skipped 1 unreadable" in printed
    assert f"{photo_dir / 'broken.jpg'}: not an image" in printed
    assert main(["search", "--index", str(out), "--text", "a cat", "-k", "4", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[0].split()[0] == "1" and str(photo_dir) in lines[0]
    assert main(["search", "--index", str(out), "--text", "a cat", "--json", "--device", "cpu"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert len(results) == 9 and [r["rank"] for r in results] == list(range(1, 10))
    assert main(["search", "--index", str(photo_dir), "--text", "x"]) == 2
    assert "moeclip search: error:" in capsys.readouterr().err


def test_model_reference_of_a_checkpoint_file_is_absolute(tmp_path, monkeypatch):
    """`moeclip index --model clip-moe.pt` from one folder, `moeclip search` from another: the index must
    remember where the file is."""
    (tmp_path / "clip-moe.pt").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert model_reference("clip-moe.pt") == str(tmp_path.resolve() / "clip-moe.pt")
    assert model_reference("ViT-B-32:openai") == "ViT-B-32:openai"


def test_index_of_shards_equals_the_index_of_the_same_files(micro, micro_dir, tmp_path):
    """`moeclip index 'val-{...}.tar'`: one row per image member, keyed `shard.tar#member`, embedded exactly
    like the same PNG files listed by the CSV."""
    from moeclip.data.synth import SynthSpec, write_corpus
    spec = SynthSpec(train=1, val=12, seed=2)
    csv = write_corpus(tmp_path / "csv", spec)["val"]
    wds = write_corpus(tmp_path / "wds", spec, format="wds", shard_size=5)["val"]
    a, b = (_build(micro, micro_dir, src, tmp_path / name, batch_size=4) for name, src in (("a", csv), ("b", wds)))
    assert a["count"] == b["count"] == 12 and b["complete"] and not b["skipped"]
    emb_a, _, _, _ = _snapshot(tmp_path / "a")
    emb_b, manifest, _, _ = _snapshot(tmp_path / "b")
    assert np.array_equal(emb_a, emb_b)
    first = json.loads(manifest.decode().splitlines()[7])
    assert first == str((tmp_path / "wds" / "val-000001.tar").absolute()) + "#000007.png"
