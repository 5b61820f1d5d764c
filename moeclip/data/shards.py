"""Webdataset shards (open_clip's `data.train='shards/{000000..000099}.tar'`) read as rows with random access.

Each tar is indexed once when the dataset opens: members are grouped into samples by webdataset's own key
convention and code (`group_by_keys`: a sample is the run of adjacent members sharing the name before the first
dot), the caption (`txt`, else a `json` member's caption field) is read eagerly, and the image member
(`jpg`, `png`, `jpeg`, `webp`, open_clip's order) is remembered by byte offset. An item then reads its image
with one seek, so cluster-conditioned batches (`moeclip.data.sampler`) draw from shards as from a table, and a
row-order pass reads each shard front to back. The index lives in memory only: shards stay read-only and a
resumed run re-indexes the same bytes into the same rows.

Bad samples are skipped and counted like bad table rows: a sample without an image or caption at index time,
an undecodable image when it is read. A tar that cannot be parsed ends the run with one line naming it.
"""
from __future__ import annotations

import functools
import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys

from moeclip.data.dataset import CaptionDataset, DataError, SkipLog, load_image
from moeclip.data.rows import Rows

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = ("jpg", "png", "jpeg", "webp")  # open_clip: rename(image="jpg;png;jpeg;webp"), first wins
CAPTION_SUFFIXES = ("txt", "json")                # read while indexing; everything else is read on demand
CAPTION_FIELDS = ("caption", "title", "text", "txt")  # a json member's caption, when there is no txt member
COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
KEY_SEP = "#"  # an image's key: 'shard.tar#member' (one per sample, stable across runs)


def is_shards(path: str | Path) -> bool:
    """`--data` routing: a `.tar` path or brace pattern (`dir/{000000..000099}.tar`, `::` joins several)."""
    first = str(path).split("::")[0].lower()
    return first.endswith(".tar") or first.endswith(COMPRESSED)


def shard_paths(pattern: str | Path) -> list[Path]:
    """The shards a pattern names (webdataset's expansion: braces, `::`, `$WDS_` variables), all present."""
    pattern = str(pattern)
    paths = [Path(u) for u in expand_urls(pattern)]
    for p in paths:
        if str(p).lower().endswith(COMPRESSED):
            raise DataError(f"{p}: compressed shards cannot be read by position; store plain .tar shards "
                            "(webdataset's TarWriter without compress, or `tar cf`)")
        if not p.is_file():
            raise DataError(f"{p}: shard not found ({pattern} names {len(paths)} shards)")
    return paths


def shards_exist(pattern: str | Path) -> bool:
    try:
        return bool(shard_paths(pattern))
    except DataError:
        return False


class _CountSkips:
    """A webdataset exception handler (`handler=` protocol: return True to go on) that counts what it skips."""

    def __init__(self, skips: SkipLog, shard: Path) -> None:
        self.skips, self.shard = skips, shard

    def __call__(self, exn: Exception) -> bool:
        text = str(exn.args[0]) if exn.args else type(exn).__name__
        self.skips.add("duplicate member" if "duplicate" in text else "bad member", f"{self.shard}: {text}")
        return True


def _files(tar: tarfile.TarFile, shard: Path, size: int) -> Iterator[dict[str, Any]]:
    """webdataset's file records (`fname`, `data`, `__url__`): caption members as bytes, images as (offset, size).

    Hand-written rather than webdataset's `tar_file_iterator`: that reads every image's bytes in stream order and
    keeps no offsets, and random access needs the offsets without reading the images.
    """
    for info in tar:
        if not info.isreg() or (info.name.startswith("__") and info.name.endswith("__")):  # webdataset's meta
            continue
        if info.offset_data + info.size > size:
            raise DataError(f"{shard}: truncated tar (member {info.name} runs past the end of the file); "
                            "re-copy or re-write the shard")
        suffix = _suffix(info.name)
        if suffix in CAPTION_SUFFIXES:
            data: Any = tar.extractfile(info).read()
        else:
            data = (info.offset_data, info.size)
        yield {"fname": info.name, "data": data, "__url__": str(shard)}


def _suffix(name: str) -> str:
    """webdataset's extension (`base_plus_ext`): all after the first dot of the base name, lower-cased."""
    return name.rsplit("/", 1)[-1].partition(".")[2].lower()


def _check_end(tar: tarfile.TarFile, shard: Path, size: int) -> None:
    """tarfile stops quietly at a damaged or cut-off header after the first, and at a file cut between members:
    past the last member there must be tar's end-of-archive zero blocks and nothing else, or samples would be lost
    without a word."""
    f = tar.fileobj
    f.seek(tar.offset)
    if size - tar.offset < tarfile.BLOCKSIZE:
        raise DataError(f"{shard}: truncated tar (it ends at byte {size} without tar's end-of-archive blocks); "
                        "re-copy or re-write the shard")
    while chunk := f.read(1 << 20):
        if chunk.count(0) != len(chunk):
            raise DataError(f"{shard}: corrupt tar (unreadable header at byte {tar.offset} of {size}); "
                            "re-copy or re-write the shard")


def index_shard(shard: Path, skips: SkipLog) -> Iterator[dict[str, Any]]:
    """Samples of one shard as webdataset groups them (`__key__`, suffix -> bytes or (offset, size))."""
    size = shard.stat().st_size
    try:
        with tarfile.open(shard, mode="r:") as tar:
            yield from group_by_keys(_files(tar, shard, size), handler=_CountSkips(skips, shard))
            _check_end(tar, shard, size)
    except (tarfile.TarError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{shard}: not a readable tar file ({e}); re-copy or re-write the shard") from None


def sample_row(sample: dict[str, Any], shard: Path) -> tuple[dict[str, Any] | None, str]:
    """(row, '') for a usable sample, (None, why) for one to skip. The row keeps a json member's scalar fields
    as columns (factor and class columns), as strings like a table's cells; keys starting with '_' are ours."""
    image = next((s for s in IMAGE_SUFFIXES if s in sample), None)
    if image is None:
        return None, "no image member (jpg/png/jpeg/webp)"
    meta: dict[str, Any] = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"].decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None, "json member not valid JSON"
        if not isinstance(meta, dict):
            return None, "json member not an object"
    caption = ""
    if "txt" in sample:
        try:
            caption = sample["txt"].decode("utf-8-sig").strip()
        except UnicodeDecodeError:
            return None, "txt member not UTF-8"
    if not caption:
        caption = next((meta[k].strip() for k in CAPTION_FIELDS if isinstance(meta.get(k), str) and meta[k].strip()),
                       "")
    if not caption:
        return None, "no caption (txt member or json caption)" if "txt" not in sample else "empty caption"
    row = {k: _cell(v) for k, v in meta.items() if not k.startswith("_")}
    key = sample["__key__"]
    row.update(_path=f"{shard}{KEY_SEP}{key}.{image}", _caption=caption, _line=key, _member=sample[image])
    return row, ""


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def _warn_lacking(rows: list[dict[str, Any]], where: Path) -> None:
    """Rows become a table (`Rows.from_dicts`: a field a row lacks is an empty cell); say which json fields
    some samples lack, and in how many, rather than fill them in without a word."""
    seen: Counter = Counter(k for row in rows for k in row)
    lacking = {k: len(rows) - n for k, n in seen.items() if n < len(rows)}
    if lacking:
        log.warning("%s: json field(s) missing from some samples, read as empty: %s", where,
                    ", ".join(f"'{k}' in {n}" for k, n in lacking.items()))


def read_member(shard: str | Path, offset: int, size: int) -> bytes:
    """One member's bytes by position (a file opened per read: no handle to share across DataLoader workers)."""
    with open(shard, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise EOFError(f"{shard}: {size} bytes at {offset} expected, {len(data)} read (the shard changed)")
    return data


class ShardDataset(CaptionDataset):
    """A `CaptionDataset` whose rows come from webdataset shards (same items, same ids, same skips)."""

    def __init__(self, pattern: str | Path, transform: Callable | None = None, max_caption_chars: int = 1000,
                 cache_mb: float = 0) -> None:
        # CaptionDataset.__init__ parses a CSV; set the same attributes from the shards instead.
        self.table = Path(str(pattern))
        self.transform = transform
        self.set_cache(cache_mb)
        self.skips = SkipLog()
        self.shards = [str(p) for p in shard_paths(pattern)]
        rows, shard_of, offsets, sizes = [], [], [], []
        for s, shard in enumerate(self.shards):
            for sample in index_shard(Path(shard), self.skips):
                row, why = sample_row(sample, Path(shard))
                if row is None:
                    self.skips.add(why, f"{shard}:{sample['__key__']}")
                    continue
                offset, size = row.pop("_member")
                row["_caption"] = row["_caption"][:max_caption_chars]
                rows.append(row)
                shard_of.append(s)
                offsets.append(offset)
                sizes.append(size)
        if not rows:
            raise DataError(f"{pattern}: no usable samples in {len(self.shards)} shard(s) "
                            f"({self.skips.summary() if self.skips.counts else 'the shards are empty'})")
        _warn_lacking(rows, self.table)
        self.rows = Rows.from_dicts(rows)
        # where each row's image lies: kept beside the rows (numbers, not string columns)
        self._shard = np.asarray(shard_of, dtype=np.int32)
        self._offset = np.asarray(offsets, dtype=np.int64)
        self._size = np.asarray(sizes, dtype=np.int64)
        if self.skips.counts:
            log.warning("%s: %s", self.table, self.skips.summary())
        self._index_rows()

    def subset(self, indices: Sequence[int]) -> "ShardDataset":
        """`CaptionDataset.subset`, with each kept row's image position carried along."""
        sub = super().subset(indices)
        idx = np.asarray(indices, dtype=np.int64)
        sub._shard, sub._offset, sub._size = self._shard[idx], self._offset[idx], self._size[idx]
        return sub

    def open_image(self, i: int) -> Image.Image:
        data = read_member(self.shards[self._shard[i]], int(self._offset[i]), int(self._size[i]))
        return load_image(io.BytesIO(data))


def load_keyed_image(path: str) -> Image.Image:
    """An image by the key a `ShardDataset` row has (`shard.tar#member`), or a plain file path: what `moeclip
    index` walks. A shard's member offsets are found once per process (`_member_offsets`)."""
    shard, sep, member = path.rpartition(KEY_SEP)
    if sep and is_shards(shard) and Path(shard).is_file():
        where = _member_offsets(shard).get(member)
        if where is None:
            raise FileNotFoundError(f"{shard}: no member {member}")
        return load_image(io.BytesIO(read_member(shard, *where)))
    return load_image(path)


@functools.lru_cache(maxsize=8)
def _member_offsets(shard: str) -> dict[str, tuple[int, int]]:
    """Member name (suffix lower-cased, as in the keys) -> (offset, size), from the tar's headers alone."""
    with tarfile.open(shard, mode="r:") as tar:
        return {info.name[:len(info.name) - len(_suffix(info.name))] + _suffix(info.name):
                (info.offset_data, info.size) for info in tar if info.isreg()}
