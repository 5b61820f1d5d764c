"""Every kind of bad input is skipped and counted, or stops the run with one line naming the file.

Each case here is a row of docs/reliability.md; keep the two in step.
"""
import io as _io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from moeclip.data.dataset import CaptionDataset, Collate, DataError, load_image, record_skips


def _png_with_declared_size(path, w, h):
    """A tiny PNG whose header claims w x h pixels: a decompression bomb in disguise."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = zlib.compress(b"\x00" * 16)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    d = {}
    d["good"] = tmp_path / "good.png"; rgb.save(d["good"])
    buf = _io.BytesIO(); rgb.save(buf, "PNG"); data = buf.getvalue()
    d["truncated_png"] = tmp_path / "trunc.png"; d["truncated_png"].write_bytes(data[: len(data) // 2])
    buf = _io.BytesIO(); rgb.save(buf, "JPEG"); jpg = buf.getvalue()
    d["truncated_jpeg"] = tmp_path / "trunc.jpg"; d["truncated_jpeg"].write_bytes(jpg[: len(jpg) // 3])
    d["corrupt"] = tmp_path / "corrupt.png"; d["corrupt"].write_bytes(data[:40] + rng.bytes(200))
    d["zero"] = tmp_path / "zero.png"; d["zero"].write_bytes(b"")
    d["text"] = tmp_path / "notes.jpg"; d["text"].write_text("this is not an image\n")
    d["bomb"] = tmp_path / "bomb.png"; _png_with_declared_size(d["bomb"], 40000, 40000)
    d["grey"] = tmp_path / "grey.png"; rgb.convert("L").save(d["grey"])
    d["cmyk"] = tmp_path / "cmyk.jpg"; rgb.convert("CMYK").save(d["cmyk"])
    d["palette"] = tmp_path / "pal.png"; rgb.convert("P").save(d["palette"])
    d["16bit"] = tmp_path / "deep.png"
    Image.fromarray((rng.integers(0, 65535, (20, 30))).astype(np.uint16)).save(d["16bit"])
    d["alpha"] = tmp_path / "alpha.png"; rgb.convert("RGBA").save(d["alpha"])
    exif = Image.Exif(); exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    d["exif"] = tmp_path / "rot.jpg"; rgb.save(d["exif"], exif=exif)
    d["dir"] = tmp_path / "adir.png"; d["dir"].mkdir()
    return d


@pytest.mark.parametrize("name", ["grey", "cmyk", "palette", "16bit", "alpha"])
def test_odd_modes_load_as_rgb(images, name):
    im = load_image(images[name])
    assert im.mode == "RGB" and im.size == (30, 20)
    assert np.asarray(im).std() > 0  # 16-bit data is rescaled, not clipped to white


def test_exif_rotation_applied(images):
    assert load_image(images["exif"]).size == (20, 30)


@pytest.mark.parametrize("name,reason", [("truncated_png", "corrupt image"), ("truncated_jpeg", "corrupt image"),
                                         ("corrupt", "not an image"), ("zero", "not an image"),
                                         ("text", "not an image"), ("bomb", "image too large"),
                                         ("dir", "unreadable file")])
def test_bad_files_are_skipped_with_reason(images, tmp_path, name, reason):
    table = tmp_path / "t.csv"
    table.write_text(f"filepath,title\n{images['good']},ok\n{images[name]},bad one\n")
    ds = CaptionDataset(table)
    batch = Collate(None)([ds[0], ds[1]])
    record_skips(batch, ds.skips)
    assert ds.skips.counts == {reason: 1}, ds.skips.counts
    assert len(batch["image"]) == 1
    assert f"t.csv:3" in ds.skips.examples[0] and images[name].name in ds.skips.examples[0]


def test_paths_relative_absolute_missing(images, tmp_path):
    sub = tmp_path / "sub"; sub.mkdir()
    table = sub / "t.csv"
    table.write_text(f"filepath,title\n../good.png,relative\n{images['good']},absolute\nnope.png,missing\n")
    ds = CaptionDataset(table)
    assert os.path.exists(ds.rows[0]["_path"]) and os.path.exists(ds.rows[1]["_path"])
    batch = Collate(None)([ds[i] for i in range(3)])
    record_skips(batch, ds.skips)
    assert ds.skips.counts == {"missing file": 1} and len(batch["image"]) == 2


def test_captions_empty_long_and_non_utf8(images, tmp_path):
    long = "word " * 5000
    table = tmp_path / "t.csv"
    table.write_text(f'filepath,title\n{images["good"]},""\n{images["good"]},   \n{images["good"]},{long}\n')
    ds = CaptionDataset(table)
    assert ds.skips.counts == {"empty caption": 2} and len(ds) == 1 and len(ds.rows[0]["_caption"]) == 1000
    bad = tmp_path / "latin1.csv"
    bad.write_bytes(f"filepath,title\n{images['good']},caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.csv: not UTF-8.*re-save"):
        CaptionDataset(bad)


def test_tokenizer_truncates_long_captions():
    from moeclip.model.factory import tokenizer_for
    tok = tokenizer_for("moeclip-micro", {"text_cfg": {"context_length": 20}})
    assert tok(["word " * 5000]).shape == (1, 20)


def test_table_structure(images, tmp_path):
    t = tmp_path / "t.csv"
    t.write_text("path,text\nx,y\n")
    with pytest.raises(DataError, match=r"t.csv: missing column"):
        CaptionDataset(t)
    t.write_text(f'filepath,title\n{images["good"]},"unclosed quote\n{images["good"]},fine\n')
    with pytest.raises(DataError, match=r"t.csv:2: .*unbalanced quote"):  # would swallow the rest of the file
        CaptionDataset(t)
    t.write_text(f"filepath,title\n{images['good']},a,extra\n{images['good']}\n{images['good']},fine\n")
    ds = CaptionDataset(t)
    assert ds.skips.counts == {"malformed row (field count differs from header)": 2} and len(ds) == 1
    t.write_text(f"\ufefffilepath,title\n{images['good']},bom ok\n{images['good']},bom ok\n")
    ds = CaptionDataset(t)
    assert len(ds) == 2 and ds.duplicate_rows == 1  # duplicates kept (and counted), not dropped
    with pytest.raises(DataError, match="not found"):
        CaptionDataset(tmp_path / "absent.csv")
