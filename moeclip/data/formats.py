"""Which reader a data file needs: CSV/TSV tables, Karpathy-split JSON (COCO/Flickr), ShareGPT4V JSON,
webdataset shards (a `.tar` path or brace pattern).

Every place that takes a data path (training, evaluation, expert analysis, search indexing) opens it here,
so a format works everywhere or nowhere. JSON formats are told apart by content (a list is ShareGPT4V, an
object is Karpathy), so a file's name never matters; shards are told by their `.tar` suffix, as webdataset does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

from moeclip.data.dataset import CaptionDataset
from moeclip.data.karpathy import KarpathyDataset, is_karpathy
from moeclip.data.shards import ShardDataset, is_shards, shards_exist
from moeclip.data.sharegpt4v import ShareGPT4VDataset, is_sharegpt4v

Format = Literal["table", "karpathy", "sharegpt4v", "shards"]


def data_format(path: str | Path) -> Format:
    if is_shards(path):
        return "shards"
    if is_sharegpt4v(path):
        return "sharegpt4v"
    return "karpathy" if is_karpathy(path) else "table"


def open_dataset(path: str | Path, transform: Callable | None = None, split: str = "test",
                 image_root: str | Path | None = None, cache_mb: float = 0) -> CaptionDataset:
    """A `CaptionDataset` (rows with `_path`/`_caption`, ids, skips) over any supported file.

    split: the Karpathy split (that format only). image_root: the folder relative image paths resolve against
    (default: the data file's folder), for every format but shards.
    """
    kind = data_format(path)
    if kind == "shards":  # the images are inside the shards: image_root does not apply
        return ShardDataset(path, transform, cache_mb=cache_mb)
    if kind == "sharegpt4v":
        return ShareGPT4VDataset(path, transform, image_root=image_root, cache_mb=cache_mb)
    if kind == "karpathy":
        ds: CaptionDataset = KarpathyDataset(path, transform, split=split, image_root=image_root)
        ds.set_cache(cache_mb)
        return ds
    return CaptionDataset(path, transform, cache_mb=cache_mb, image_root=image_root)


def data_exists(path: str | Path) -> bool:
    """A data file is there (for shards: every shard its pattern names)."""
    return shards_exist(path) if is_shards(path) else Path(path).exists()


def has_factor_columns(path: str | Path) -> bool:
    """Formats whose rows can carry a synthetic corpus's factor columns (factors.json beside them)."""
    return data_format(path) in ("table", "shards")
