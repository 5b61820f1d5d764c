"""Which images an index covers: every image file under a folder, the `filepath` column of a table, the
images of a caption JSON (ShareGPT4V, Karpathy), or the image members of webdataset shards (as
`shard.tar#member` keys, read by `moeclip.data.shards.load_keyed_image`).

The list is fixed when an index starts (saved as `sources.json`), so a resumed run walks exactly the
same files in the same order even if the folder changed meanwhile.
"""
from __future__ import annotations

import os
from pathlib import Path

from moeclip.data.dataset import DataError, read_table

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def list_images(source: str | Path, img_key: str = "filepath", image_root: str | Path | None = None) -> list[str]:
    """Absolute image paths: a folder (recursive, sorted, common extensions), a CSV/TSV's `img_key` column, or
    a caption JSON's images (relative paths resolve against `image_root`, default the file's folder; repeated
    images are kept once)."""
    source = Path(source)
    if source.is_dir():
        found = []
        for dirpath, dirnames, filenames in os.walk(source, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [str(Path(dirpath, f).absolute()) for f in filenames
                      if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
        if not found:
            raise DataError(f"{source}: no image files found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        return sorted(found)
    from moeclip.data.formats import data_format, open_dataset
    if not source.exists() and data_format(source) != "shards":
        raise DataError(f"{source}: no such folder or table; pass a folder of images or a CSV with a "
                        f"'{img_key}' column")
    if data_format(source) != "table":  # every split of a Karpathy file: an index covers all its images
        paths = open_dataset(source, split="all", image_root=image_root).paths
        return list(dict.fromkeys(str(Path(p).absolute()) for p in paths))
    rows = read_table(source, img_key=img_key, caption_key=img_key)
    root = (Path(image_root) if image_root is not None else source.parent).absolute()
    seen: dict[str, None] = {}
    for row in rows:
        p = Path(row.get(img_key) or "")
        if str(p) in ("", "."):
            continue
        seen.setdefault(str(p if p.is_absolute() else root / p), None)
    if not seen:
        raise DataError(f"{source}: the '{img_key}' column is empty")
    return list(seen)
