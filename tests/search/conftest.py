"""A small folder of real image files (nested, mixed formats) plus one unreadable file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def photo_dir(tmp_path) -> Path:
    root = tmp_path / "photos"
    (root / "nested" / "deeper").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(9):
        sub = root if i < 4 else root / "nested" if i < 7 else root / "nested" / "deeper"
        arr = (rng.random((20 + i, 24, 3)) * 255).astype(np.uint8)
        arr[..., i % 3] = 255  # a dominant channel, so images differ clearly
        Image.fromarray(arr).save(sub / f"img{i}.{('png', 'jpg', 'webp')[i % 3]}")
    (root / "broken.jpg").write_bytes(rng.bytes(700))  # random bytes named like an image
    (root / "notes.txt").write_text("not an image, not listed")
    (root / ".hidden.png").write_bytes(b"")  # hidden files are ignored
    return root
