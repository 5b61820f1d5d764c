"""COCO / Flickr30k captions in the Karpathy-split JSON (`dataset_coco.json`, `dataset_flickr30k.json`).

The retrieval benchmarks people report (COCO 5k test, Flickr30k 1k test) are defined by these
files, so `moeclip eval --data dataset_coco.json` must read them as they are: one image entry with
`filename` (COCO adds a `filepath` folder such as `val2014`), a `split`, and several `sentences`.
Each (image, sentence) becomes one row, exactly like a CSV row, so evaluation code is shared.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from moeclip.data.dataset import CaptionDataset, DataError, SkipLog, read_json_data
from moeclip.data.rows import Rows

log = logging.getLogger(__name__)


def read_karpathy(path: str | Path, split: str = "test", image_root: str | Path | None = None,
                  skips: SkipLog | None = None) -> list[dict[str, str]]:
    """Rows `{_path, _caption, _line, split, imgid}` for every sentence of every image in `split`.

    split: a Karpathy split name (`train`, `val`, `test`, `restval`) or `all`.
    image_root: folder the `filepath/filename` paths are relative to; default the JSON's folder.
    """
    path = Path(path)
    data = read_json_data(path, "Karpathy-split captions")
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DataError(f"{path}: no 'images' list; expected Karpathy-split JSON "
                        '({"images": [{"filename", "split", "sentences": [{"raw"}]}]}) or ShareGPT4V JSON '
                        '([{"image", "conversations"}])')
    root = Path(image_root) if image_root is not None else path.parent
    skips = skips if skips is not None else SkipLog()
    rows: list[dict[str, str]] = []
    splits: Counter = Counter()
    for i, img in enumerate(images):
        if not isinstance(img, dict) or "filename" not in img:
            raise DataError(f"{path}: images[{i}] has no 'filename'")
        splits[str(img.get("split"))] += 1
        if split != "all" and img.get("split") != split:
            continue
        rel = Path(img.get("filepath") or "") / img["filename"]
        file = rel if rel.is_absolute() else root / rel
        sentences = img.get("sentences")
        if not isinstance(sentences, list):
            raise DataError(f"{path}: images[{i}] ({img['filename']}) has no 'sentences' list")
        for j, sent in enumerate(sentences):
            where = f"images[{i}].sentences[{j}]"
            caption = _caption(sent)
            if not caption:
                skips.add("empty caption", f"{path}:{where}")
                continue
            rows.append({"_path": str(file), "_caption": caption, "_line": where,
                         "split": str(img.get("split")), "imgid": str(img.get("imgid", i))})
    if not rows:
        found = ", ".join(f"{s} ({n} images)" for s, n in sorted(splits.items())) or "no images"
        raise DataError(f"{path}: no captions in split '{split}' (found {found}); pass --split")
    return rows


def _caption(sent: Any) -> str:
    """`raw` is the caption as written; old files only have `tokens`."""
    if isinstance(sent, str):
        return sent.strip()
    if not isinstance(sent, dict):
        return ""
    raw = sent.get("raw")
    if isinstance(raw, str) and raw.strip():
        return raw.strip()
    tokens = sent.get("tokens")
    return " ".join(str(t) for t in tokens).strip() if isinstance(tokens, list) else ""


class KarpathyDataset(CaptionDataset):
    """A `CaptionDataset` whose rows come from a Karpathy JSON instead of a CSV (same items, same ids)."""

    def __init__(self, path: str | Path, transform: Callable | None = None, split: str = "test",
                 image_root: str | Path | None = None, max_caption_chars: int = 1000) -> None:
        # CaptionDataset.__init__ parses a CSV; set the same attributes from the JSON instead.
        self.table = Path(path)
        self.transform = transform
        self.set_cache(0)
        self.skips = SkipLog()
        self.split = split
        rows = read_karpathy(path, split, image_root, self.skips)
        for row in rows:
            row["_caption"] = row["_caption"][:max_caption_chars]
        self.rows = Rows.from_dicts(rows)
        if self.skips.counts:
            log.warning("%s: %s", self.table, self.skips.summary())
        self._index_rows()


def is_karpathy(path: str | Path) -> bool:
    """`--data` routing: a `.json` file is read as Karpathy-split captions unless its top level is a list
    (ShareGPT4V, `moeclip.data.sharegpt4v`)."""
    from moeclip.data.sharegpt4v import is_sharegpt4v
    return Path(path).suffix.lower() == ".json" and not is_sharegpt4v(path)
