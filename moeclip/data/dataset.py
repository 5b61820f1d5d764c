"""Image-caption datasets over CSV/TSV files, open_clip's conventions (`filepath`, `title`).

Bad samples never kill a run: an unreadable image is skipped and counted (in the main process,
through the collate function, so counts survive DataLoader workers); empty captions are
dropped and counted when the table is read. A run stops only when nothing usable is left.
"""
from __future__ import annotations

import csv
import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from moeclip.data.rows import Rows

log = logging.getLogger(__name__)

Image.MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs well before they eat memory


class DataError(ValueError):
    """The data cannot be used at all; the message names the file and what to do."""


@dataclass
class SkipLog:
    """Samples skipped, by reason; a few examples kept for the message."""
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}")

    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no samples skipped"
        parts = ", ".join(f"{n} {r}" for r, n in sorted(self.counts.items()))
        return f"skipped {self.total()} samples ({parts}); e.g. " + "; ".join(self.examples[:3])


def read_json_data(path: str | Path, expected: str) -> Any:
    """A caption JSON file parsed, or a one-line DataError naming the file and the format `expected`."""
    import json
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a JSON file ({e}); expected {expected}") from None


def iter_table(path: str | Path, img_key: str = "filepath", caption_key: str = "title") -> Iterator[dict[str, str]]:
    """Rows of a CSV/TSV as dicts, one at a time (all columns kept: factors and classes ride along), with
    `_line` and `_malformed` ("1" when the field count differs from the header)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="strict") as f:
            reader = csv.DictReader(f, delimiter=sep)
            header = reader.fieldnames or []
            missing = [k for k in (img_key, caption_key) if k not in header]
            if missing:
                raise DataError(f"{path}: missing column(s) {missing}; found {header}. "
                                f"Name the image column '{img_key}' and the caption column '{caption_key}'")
            start = 2
            for r in reader:
                if reader.line_num - start > 0 and any(v and "\n" in v and sep in v for v in r.values()
                                                       if isinstance(v, str)):
                    raise DataError(f"{path}:{start}: a quoted field runs on to line {reader.line_num} and swallows "
                                    "the rows in between; fix the unbalanced quote")
                start = reader.line_num + 1
                row = {k: v for k, v in r.items() if k is not None}
                row["_line"] = str(reader.line_num)
                # a row with too many or too few fields: usually a stray quote or delimiter
                row["_malformed"] = "1" if None in r or any(v is None for v in r.values()) else ""
                yield row
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); re-save the table as UTF-8") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed table ({e}); fix the quoting") from None


def read_table(path: str | Path, img_key: str = "filepath", caption_key: str = "title") -> Rows:
    """`iter_table`'s rows, stored as columns."""
    return Rows.from_dicts(iter_table(path, img_key, caption_key))


class CaptionDataset(torch.utils.data.Dataset):
    """One item per (image, caption) row; several rows may share an image.

    `rows` is columnar (`moeclip.data.rows.Rows`): 10M rows cost about their text, shared with DataLoader
    workers, where a list of dicts cost ~10 GB per process. Subclasses for other formats fill it and call
    `_index_rows`.
    """

    def __init__(self, table: str | Path, transform: Callable | None = None, img_key: str = "filepath",
                 caption_key: str = "title", max_caption_chars: int = 1000, cache_mb: float = 0,
                 image_root: str | Path | None = None) -> None:
        """image_root: the folder relative image paths resolve against (default: the table's folder)."""
        self.table = Path(table)
        self.transform = transform
        self.set_cache(cache_mb)
        self.skips = SkipLog()
        root = Path(image_root) if image_root is not None else self.table.parent

        def usable() -> Iterator[dict[str, str]]:
            for row in iter_table(self.table, img_key, caption_key):
                where = f"{self.table}:{row['_line']}"
                cap = (row.get(caption_key) or "").strip()
                if row.pop("_malformed"):
                    self.skips.add("malformed row (field count differs from header)", where)
                    continue
                if not cap:
                    self.skips.add("empty caption", where)
                    continue
                if not (row.get(img_key) or "").strip():
                    self.skips.add("empty image path", where)
                    continue
                p = Path(row[img_key].strip())
                row["_path"] = str(p if p.is_absolute() else root / p)
                row["_caption"] = cap[:max_caption_chars]
                yield row

        self.rows = Rows.from_dicts(usable())
        if not len(self.rows):
            raise DataError(f"{self.table}: no usable rows ({self.skips.summary()})")
        if self.skips.counts:
            log.warning("%s: %s", self.table, self.skips.summary())
        self._index_rows()

    def _index_rows(self) -> None:
        """Ids for multi-positive losses and metrics (identical captions / images are shared positives), and
        the count of repeated (image, caption) pairs, kept: a repeated pair is data, not an error."""
        self.caption_ids = _ids(self.rows.column("_caption"))
        self.image_ids = _ids(self.rows.column("_path"))
        cap, img = self.caption_ids.numpy(), self.image_ids.numpy()
        pairs = img * (int(cap.max(initial=0)) + 1) + cap
        self.duplicate_rows = len(pairs) - len(np.unique(pairs))

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, indices: Sequence[int]) -> "CaptionDataset":
        """The rows `indices` as a dataset of their own (ids renumbered); skips and the image cache are shared
        with this one, so what a subset skips is counted here too."""
        import copy
        sub = copy.copy(self)
        sub.rows = self.rows.take(np.asarray(indices, dtype=np.int64))
        if not len(sub.rows):
            raise DataError(f"{self.table}: an empty subset")
        sub._index_rows()
        return sub

    def set_cache(self, cache_mb: float) -> None:
        """DMU reads the same corpus in every stage and baseline: keep transformed images in memory (up to
        cache_mb; per process, so per DataLoader worker) instead of decoding them again each time."""
        self._cache: dict[str, Any] = {}
        self._cache_room = int(cache_mb * 2**20) if self.transform is not None else 0

    @property
    def captions(self) -> list[str]:
        return list(self.rows.column("_caption"))

    @property
    def paths(self) -> list[str]:
        """Each row's image path (rows sharing an image repeat it)."""
        return list(self.rows.column("_path"))

    def column(self, name: str) -> list[str]:
        if name not in self.rows.names:
            raise DataError(f"{self.table}: no column '{name}'")
        return list(self.rows.column(name))

    def where(self, i: int) -> str:
        """Where row i came from, for skip messages."""
        line = self.rows.column("_line")[i] if "_line" in self.rows.names else str(i)
        return f"{self.table}:{line}"

    def open_image(self, i: int) -> Image.Image:
        """Row i's image decoded; a subclass that keeps images elsewhere (shards) reads them here."""
        return load_image(self.rows.column("_path")[i])

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, caption = self.rows.column("_path")[i], self.rows.column("_caption")[i]
        item = {"index": i, "caption": caption, "ok": True}
        cached = self._cache.get(path)
        if cached is not None:
            item["image"] = cached
            return item
        try:
            img = self.open_image(i)
        except Exception as e:  # any unreadable image is a skip, never a crash
            item.update(ok=False, reason=_reason(e), where=f"{self.where(i)} ({path})")
            return item
        item["image"] = self.transform(img) if self.transform else img
        size = item["image"].nbytes if isinstance(item["image"], torch.Tensor) else None
        if size is not None and size <= self._cache_room:
            self._cache[path] = item["image"]
            self._cache_room -= size
        return item


def load_image(path: str | Path | BinaryIO) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / float: rescale, don't clip
                import numpy as np
                a = np.asarray(im, dtype=np.float64)
                lo, hi = float(a.min()), float(a.max())
                im = Image.fromarray(((a - lo) / max(hi - lo, 1e-12) * 255).astype("uint8"))
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            return im.convert("RGB")


def _reason(e: Exception) -> str:
    if isinstance(e, FileNotFoundError):
        return "missing file"
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return "image too large"
    if isinstance(e, Image.UnidentifiedImageError):
        return "not an image"
    if isinstance(e, (IsADirectoryError, PermissionError)):
        return "unreadable file"
    return "corrupt image"


def _ids(values: Sequence[str]) -> torch.Tensor:
    """Dense ids in order of first appearance (equal strings, equal ids)."""
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(v, len(index)) for v in values], dtype=torch.long)


class Collate:
    """Stack good samples and tokenize captions; bad ones ride along in `skipped` for `record_skips`."""

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor] | None) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        good = [it for it in items if it["ok"]]
        bad = [(it["reason"], it["where"]) for it in items if not it["ok"]]
        batch: dict[str, Any] = {"index": torch.tensor([it["index"] for it in good], dtype=torch.long),
                                 "skipped": bad}
        if good:
            images = [it["image"] for it in good]
            batch["image"] = torch.stack(images) if isinstance(images[0], torch.Tensor) else images
            captions = [it["caption"] for it in good]
            batch["caption"] = captions
            if self.tokenizer is not None:
                batch["text"] = self.tokenizer(captions)
        return batch


def record_skips(batch: dict[str, Any], skips: SkipLog) -> None:
    """Call once per batch in the main process (workers cannot write to the parent's log)."""
    for reason, where in batch["skipped"]:
        skips.add(reason, where)
