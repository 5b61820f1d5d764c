"""ShareGPT4V's caption JSON (`share-captioner_coco_lcs_sam_1246k_1107.json` and the like) read as rows.

The file is a list of `{"image": relative path, "conversations": [{"from": "human", ...}, {"from": "gpt",
"value": caption}]}`; the caption is the first `gpt` turn's value, the image path is relative to an image root
(default: the JSON's folder). These are the long, detailed captions CLIP-MoE's released model was trained on.
Each entry becomes one row like a CSV row, so training, evaluation and analysis share their code; a bad entry
is skipped and counted (naming the file and the entry index), never fatal.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from moeclip.data.dataset import CaptionDataset, DataError, SkipLog, read_json_data
from moeclip.data.rows import Rows

log = logging.getLogger(__name__)

# ShareGPT4V's captions are long (~1000 characters on average): a 248-token tokenizer needs more than the
# CSV reader's 1000-character cap, and the tokenizer truncates at the model's context length anyway
MAX_CAPTION_CHARS = 4000
SNIFF_BYTES = 4096


def is_sharegpt4v(path: str | Path) -> bool:
    """`--data` routing by content: a `.json` file whose top level is a list (Karpathy JSON is an object)."""
    path = Path(path)
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES).decode("utf-8-sig", errors="ignore").lstrip()
    return head.startswith("[")


def read_sharegpt4v(path: str | Path, image_root: str | Path | None = None,
                    skips: SkipLog | None = None) -> list[dict[str, str]]:
    """Rows `{_path, _caption, _line, id}`, one per usable entry; bad entries go to `skips`."""
    path = Path(path)
    data = read_json_data(path, "ShareGPT4V captions")
    if not isinstance(data, list):
        raise DataError(f"{path}: top level is a {type(data).__name__}, not a list; expected ShareGPT4V captions "
                        '([{"image": "path", "conversations": [{"from": "gpt", "value": "caption"}]}])')
    root = Path(image_root) if image_root is not None else path.parent
    skips = skips if skips is not None else SkipLog()
    rows: list[dict[str, str]] = []
    for i, entry in enumerate(data):
        where = f"{path}:[{i}]"
        reason = _problem(entry)
        if reason:
            skips.add(reason, where)
            continue
        rel = Path(entry["image"].strip())
        rows.append({"_path": str(rel if rel.is_absolute() else root / rel), "_caption": _gpt_caption(entry),
                     "_line": f"[{i}]", "id": str(entry.get("id", ""))})
    if not rows:
        raise DataError(f"{path}: no usable entries ({skips.summary() if skips.counts else 'the list is empty'})")
    return rows


def _gpt_caption(entry: dict[str, Any]) -> str:
    for turn in entry["conversations"]:
        if isinstance(turn, dict) and turn.get("from") == "gpt":
            value = turn.get("value")
            return value.strip() if isinstance(value, str) else ""
    return ""


def _problem(entry: Any) -> str:
    """Why an entry cannot be used ('' when it can)."""
    if not isinstance(entry, dict):
        return "entry is not an object"
    image = entry.get("image")
    if not isinstance(image, str) or not image.strip():
        return "no image path"
    turns = entry.get("conversations")
    if not isinstance(turns, list) or not any(isinstance(t, dict) and t.get("from") == "gpt" for t in turns):
        return "no gpt turn"
    if not _gpt_caption(entry):
        return "empty caption"
    return ""


class ShareGPT4VDataset(CaptionDataset):
    """A `CaptionDataset` whose rows come from a ShareGPT4V JSON instead of a CSV (same items, same ids)."""

    def __init__(self, path: str | Path, transform: Callable | None = None, image_root: str | Path | None = None,
                 max_caption_chars: int = MAX_CAPTION_CHARS, cache_mb: float = 0) -> None:
        # CaptionDataset.__init__ parses a CSV; set the same attributes from the JSON instead.
        self.table = Path(path)
        self.transform = transform
        self.set_cache(cache_mb)
        self.skips = SkipLog()
        rows = read_sharegpt4v(path, image_root, self.skips)
        truncated = 0
        for row in rows:
            truncated += len(row["_caption"]) > max_caption_chars
            row["_caption"] = row["_caption"][:max_caption_chars]
        if truncated:
            log.warning("%s: %d captions longer than %d characters were cut there", self.table, truncated,
                        max_caption_chars)
        if self.skips.counts:
            log.warning("%s: %s", self.table, self.skips.summary())
        self.rows = Rows.from_dicts(rows)
        self._index_rows()
