"""Webdataset shards read as rows: the same data as the CSV corpus, bad members counted, broken tars refused."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from moeclip.data.dataset import Collate, DataError, SkipLog, record_skips
from moeclip.data.formats import data_exists, data_format, open_dataset
from moeclip.data.sampler import GroupBatchSampler
from moeclip.data.shards import ShardDataset, load_keyed_image
from moeclip.data.synth import FACTORS, SynthSpec, write_corpus
from moeclip.search.sources import list_images


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The same synthetic corpus as CSV and as shards of 16 samples."""
    root = tmp_path_factory.mktemp("both")
    spec = SynthSpec(train=40, val=8, seed=5)
    return write_corpus(root / "csv", spec), write_corpus(root / "wds", spec, format="wds", shard_size=16)


def _png(colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def _write(path, samples) -> str:
    with TarWriter(str(path)) as tar:
        for s in samples:
            tar.write(s)
    return str(path)


def test_shards_hold_the_csv_corpus(both):
    csv, wds = both
    assert str(wds["train"]).endswith("train-{000000..000002}.tar") and data_format(wds["train"]) == "shards"
    assert data_exists(wds["train"]) and not data_exists(str(wds["train"]).replace("train", "nope"))
    a, b = open_dataset(csv["train"]), open_dataset(wds["train"], image_root="/ignored")
    assert len(a) == len(b) == 40 and not b.skips.counts
    assert b.captions == a.captions and all(b.column(f) == a.column(f) for f in FACTORS)
    assert torch.equal(a.image_ids, b.image_ids) and torch.equal(a.caption_ids, b.caption_ids)
    assert b.rows[17]["_path"].endswith("train-000001.tar#000017.png")
    for i in (0, 15, 16, 39):  # both sides of a shard boundary
        assert np.array_equal(np.asarray(a[i]["image"]), np.asarray(b[i]["image"]))


def test_cluster_batches_read_by_position(both):
    """Cluster-conditioned batches are row indices; a DataLoader over shards serves them like a table."""
    csv, wds = both
    a, b = open_dataset(csv["train"], np.asarray), open_dataset(wds["train"], np.asarray)
    labels = np.arange(40) % 3
    sampler = GroupBatchSampler(labels, 40, global_batch=8, seed=1)
    for batch in sampler.global_batches(0)[:3]:
        assert len(set(labels[batch])) == 1
        for i in batch:
            assert np.array_equal(a[int(i)]["image"], b[int(i)]["image"])


def test_subset_reads_its_own_rows(both):
    """A partition (cluster specialists) is a subset: its row j must read the image of the row it was."""
    csv, wds = both
    idx = [37, 3, 20, 16]
    a, b = open_dataset(csv["train"]).subset(idx), open_dataset(wds["train"]).subset(idx)
    assert b.captions == a.captions and len(b) == 4
    for j in range(4):
        assert np.array_equal(np.asarray(a[j]["image"]), np.asarray(b[j]["image"]))


def test_bad_members_are_counted(tmp_path):
    png = _png()
    shard = _write(tmp_path / "bad-000000.tar", [
        {"__key__": "good", "png": png, "txt": b"a red square"},
        {"__key__": "jsoncap", "jpg": png, "json": json.dumps({"caption": "from json", "cls": 3}).encode()},
        {"__key__": "broken", "png": b"not an image at all", "txt": b"a broken image"},
        {"__key__": "nocap", "png": png},
        {"__key__": "emptycap", "png": png, "txt": b"  "},
        {"__key__": "noimage", "txt": b"a caption alone"},
        {"__key__": "badjson", "png": png, "json": b"{oops"},
    ])
    ds = ShardDataset(shard)
    assert ds.captions == ["a red square", "from json", "a broken image"]
    assert ds.rows[1]["cls"] == "3" and ds.rows[1]["_path"].endswith("#jsoncap.jpg")
    assert ds.column("cls") == ["", "3", ""]  # a json field some samples lack: an empty cell, as in a table
    assert dict(ds.skips.counts) == {"no caption (txt member or json caption)": 1, "empty caption": 1,
                                     "no image member (jpg/png/jpeg/webp)": 1, "json member not valid JSON": 1}
    assert any(f"{shard}:noimage" in e for e in ds.skips.examples)
    # an undecodable image is skipped when read, and counted in the main process like a bad file on disk
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=Collate(None))
    skips = SkipLog()
    kept = []
    for batch in loader:
        record_skips(batch, skips)
        kept += batch["index"].tolist()
    assert kept == [0, 1] and dict(skips.counts) == {"not an image": 1}
    assert f"{shard}#broken.png" in skips.examples[0]


def test_duplicate_member_counted_by_webdataset_grouping(tmp_path):
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("a.png", _png()), ("a.txt", b"first"), ("a.txt", b"second")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ds = ShardDataset(str(path))
    assert ds.captions == ["first"] and dict(ds.skips.counts) == {"duplicate member": 1}


def _one_line_naming(exc, shard):
    msg = str(exc.value)
    assert "\n" not in msg and str(shard) in msg, msg
    return msg


def test_broken_tars_end_with_one_line(tmp_path, both):
    good = open(str(both[1]["train"]).replace("{000000..000002}", "000000"), "rb").read()
    with tarfile.open(fileobj=io.BytesIO(good)) as tar:
        member = tar.getmembers()[4]  # sample 1's second member
    # cut inside a header, inside a member's data, exactly between members: tarfile alone would end quietly
    # at the first and last, losing the rest of the shard
    for cut in (member.offset + 100, member.offset_data + 10, member.offset):
        truncated = tmp_path / f"trunc-{cut}.tar"
        truncated.write_bytes(good[:cut])
        with pytest.raises(DataError) as e:
            ShardDataset(str(truncated))
        assert "truncated" in _one_line_naming(e, truncated) or "unexpected end" in str(e.value), cut
    # a damaged header after the first
    damaged = tmp_path / "damaged-000000.tar"
    data = bytearray(good)
    data[member.offset: member.offset + 100] = b"\xff" * 100
    damaged.write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        ShardDataset(str(damaged))
    _one_line_naming(e, damaged)
    junk = tmp_path / "junk-000000.tar"
    junk.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(DataError) as e:
        ShardDataset(str(junk))
    assert "not a readable tar" in _one_line_naming(e, junk)
    with pytest.raises(DataError) as e:
        ShardDataset(str(tmp_path / "damaged-{000000..000001}.tar"))
    assert "shard not found" in _one_line_naming(e, tmp_path / "damaged-000001.tar")
    (tmp_path / "z.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match="compressed shards"):
        ShardDataset(str(tmp_path / "z.tar.gz"))
    empty = _write(tmp_path / "empty.tar", [{"__key__": "x", "txt": b"caption, no image"}])
    with pytest.raises(DataError, match="no usable samples"):
        ShardDataset(empty)


def test_index_walks_shard_members(both):
    """`moeclip index` on shards: one key per image, each loads the same pixels as the CSV's file."""
    csv, wds = both
    keys = list_images(wds["val"])
    files = list_images(csv["val"])
    assert len(keys) == len(files) == 8 and all("#" in k for k in keys)
    for k, f in zip(keys, files):
        assert np.array_equal(np.asarray(load_keyed_image(k)), np.asarray(load_keyed_image(f)))
    with pytest.raises(FileNotFoundError):
        load_keyed_image(keys[0].replace("000000.png", "999999.png"))
