import os

import pytest

from moeclip.data.dataset import CaptionDataset, Collate, DataError, record_skips


def _bad_table(corpus, tmp_path):
    root = corpus["val"].parent
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "random.png").write_bytes(os.urandom(500))
    good = root / "images" / "val" / "000000.png"
    lines = ["filepath,title",
             f"{good},a good row",
             f"{tmp_path / 'missing.png'},a missing file",
             "zero.png,a zero-byte file",
             "random.png,random bytes",
             f"{good},",
             f"{root / 'images' / 'val' / '000001.png'},another good row"]
    p = tmp_path / "bad.csv"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_bad_rows_are_skipped_and_counted(corpus, tmp_path):
    ds = CaptionDataset(_bad_table(corpus, tmp_path))
    assert len(ds) == 5 and ds.skips.counts["empty caption"] == 1
    batch = Collate(None)([ds[i] for i in range(len(ds))])
    record_skips(batch, ds.skips)
    assert ds.skips.counts == {"empty caption": 1, "missing file": 1, "not an image": 2}
    assert len(batch["image"]) == 2
    assert "missing.png" in " ".join(ds.skips.examples)


def test_bad_rows_evaluate_to_completion(corpus, tmp_path, micro_dir):
    from moeclip import load
    from moeclip.eval.evaluate import evaluate
    model, pre, tok = load(micro_dir)
    m = evaluate(model, pre, tok, _bad_table(corpus, tmp_path), progress=False)
    assert m["num_images"] == 2 and m["skipped"] == {"empty caption": 1, "missing file": 1, "not an image": 2}


def test_missing_column_and_nothing_usable(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("path,caption\na.png,x\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['filepath', 'title'\]"):
        CaptionDataset(p)
    p.write_text("filepath,title\na.png,\n")
    with pytest.raises(DataError, match="no usable rows"):
        CaptionDataset(p)


def test_relative_paths_resolve_against_table(corpus):
    ds = CaptionDataset(corpus["val"])
    assert os.path.isabs(ds.rows[0]["_path"]) and os.path.exists(ds.rows[0]["_path"])


def test_tsv(corpus, tmp_path):
    rows = open(corpus["val"]).read().splitlines()[:3]
    p = tmp_path / "t.tsv"
    root = corpus["val"].parent
    p.write_text("filepath\ttitle\n" + "\n".join(f"{root / r.split(',')[0]}\t{r.split(',')[1]}" for r in rows[1:]))
    assert len(CaptionDataset(p)) == 2


def test_image_cache_serves_the_same_tensors_within_its_budget(corpus, tmp_path):
    import shutil

    import torch
    from torchvision import transforms
    root = corpus["val"].parent
    for i in range(3):
        shutil.copy(root / "images" / "val" / f"00000{i}.png", tmp_path / f"{i}.png")
    (tmp_path / "t.csv").write_text("filepath,title\n0.png,a\n1.png,b\n2.png,c\n0.png,d\n")
    tf = transforms.ToTensor()
    one = tf(CaptionDataset(tmp_path / "t.csv")[0]["image"]).nbytes
    ds = CaptionDataset(tmp_path / "t.csv", tf, cache_mb=2.5 * one / 2**20)  # room for two images
    first = [ds[i]["image"] for i in range(4)]
    for i in range(3):
        (tmp_path / f"{i}.png").unlink()
    again = [ds[i] for i in range(4)]
    # images 0 and 1 come from memory (0 also for the row that repeats it); 2 did not fit and is read again
    assert torch.equal(again[0]["image"], first[0]) and torch.equal(again[3]["image"], first[0])
    assert torch.equal(again[1]["image"], first[1])
    assert not again[2]["ok"] and "image" not in again[2]
