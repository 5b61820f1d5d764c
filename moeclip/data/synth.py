"""Synthetic image-caption corpus with factors of deliberately unequal salience.

Each image is one object on a grey background; its caption names every factor. Colour, position
and size are global, many-pixel signals and are learned first; the object's shape and its
low-contrast fill pattern live in a few pixels under noise, so a briefly trained CLIP suppresses
them: the situation multistage contrastive learning exists for. Presets reorder the salience so results
can be checked on more than one ordering. docs/corpus.md describes the factors.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from moeclip.io import atomic_path, write_json

FACTORS: dict[str, list[str]] = {
    "size": ["small", "medium", "large"],
    "colour": ["red", "green", "blue", "yellow", "purple", "orange", "white", "cyan"],
    "pattern": ["plain", "striped", "checkered", "dotted"],
    "shape": ["circle", "square", "triangle", "diamond", "cross", "ring"],
    "position": ["top left", "top", "top right", "left", "center", "right",
                 "bottom left", "bottom", "bottom right"],
}
TEMPLATE = "a {size} {colour} {pattern} {shape} at the {position}"

_RGB = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.25, 0.95),
        "yellow": (0.95, 0.9, 0.1), "purple": (0.6, 0.15, 0.8), "orange": (1.0, 0.55, 0.05),
        "white": (0.95, 0.95, 0.95), "cyan": (0.1, 0.85, 0.9)}


@dataclass
class Salience:
    """How visible each factor is; smaller = harder to learn."""
    colour_saturation: float = 1.0   # 0 = every colour the same grey
    pattern_contrast: float = 0.10   # brightness swing of the fill pattern
    noise: float = 0.04              # per-pixel Gaussian noise
    jitter: int = 2                  # max position jitter in pixels


PRESETS: dict[str, Salience] = {
    # colour/position/size easy; shape and pattern suppressed
    "default": Salience(),
    # colour washed out and patterns bold: a different salience ordering
    "muted": Salience(colour_saturation=0.18, pattern_contrast=0.7),
}


@dataclass
class SynthSpec:
    train: int = 20000
    val: int = 2000
    seed: int = 0
    image_size: int = 32
    preset: str = "default"
    salience: Salience | None = None  # overrides the preset when given


def render(values: dict[str, str], sal: Salience, size: int, rng: np.random.Generator) -> np.ndarray:
    """One image as float RGB in [0, 1], shape (size, size, 3)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    pos = FACTORS["position"].index(values["position"])
    cell = size / 3.0
    cy = (pos // 3 + 0.5) * cell + rng.integers(-sal.jitter, sal.jitter + 1)
    cx = (pos % 3 + 0.5) * cell + rng.integers(-sal.jitter, sal.jitter + 1)
    r = {"small": 0.17, "medium": 0.24, "large": 0.31}[values["size"]] * size / 2 * 1.6
    dy, dx = yy - cy, xx - cx
    mask = _shape_mask(values["shape"], dy, dx, r)

    base = np.array(_RGB[values["colour"]], dtype=np.float32)
    grey = base.mean()
    colour = grey + sal.colour_saturation * (base - grey)
    pat = _pattern(values["pattern"], yy, xx)  # in {-1, +1} or 0
    fill = np.clip(colour[None, None, :] * (1.0 + sal.pattern_contrast * pat[..., None]), 0, 1)

    img = np.where(mask[..., None], fill, np.float32(0.35))
    img = img + rng.normal(0.0, sal.noise, img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0)


def _shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    ady, adx = np.abs(dy), np.abs(dx)
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return (ady <= r * 0.85) & (adx <= r * 0.85)
    if shape == "triangle":
        return (dy <= r * 0.8) & (dy >= -r) & (adx <= (dy + r) * 0.6)
    if shape == "diamond":
        return ady + adx <= r
    if shape == "cross":
        return ((ady <= r * 0.35) & (adx <= r)) | ((adx <= r * 0.35) & (ady <= r))
    if shape == "ring":
        d2 = dy**2 + dx**2
        return (d2 <= r**2) & (d2 >= (r * 0.55) ** 2)
    raise ValueError(f"unknown shape {shape!r}")


def _pattern(pattern: str, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    iy, ix = np.floor(yy).astype(int), np.floor(xx).astype(int)
    if pattern == "plain":
        return np.zeros_like(yy)
    if pattern == "striped":
        return np.where((iy // 2) % 2 == 0, 1.0, -1.0)
    if pattern == "checkered":
        return np.where(((iy // 2) + (ix // 2)) % 2 == 0, 1.0, -1.0)
    if pattern == "dotted":
        return np.where((iy % 3 == 1) & (ix % 3 == 1), -1.5, 0.4)
    raise ValueError(f"unknown pattern {pattern!r}")


def caption(values: dict[str, str]) -> str:
    return TEMPLATE.format(**values)


def write_corpus(out: str | Path, spec: SynthSpec, format: str = "csv", shard_size: int = 1000) -> dict[str, Path]:
    """Write the corpus and factors.json; return each split's data path (a CSV, or a shard pattern).

    format "csv": images/{split}/*.png and {split}.csv. format "wds": webdataset shards
    {split}-NNNNNN.tar of `shard_size` samples, each a png, a txt caption and a json of the factor columns:
    the same images (same PNG bytes), captions and columns in the same order as the CSV.
    Deterministic by (seed, split); an existing complete split is kept, so re-running is cheap.
    """
    out = Path(out)
    if spec.preset not in PRESETS:
        raise ValueError(f"unknown preset {spec.preset!r}; choose one of {sorted(PRESETS)}")
    if format not in ("csv", "wds"):
        raise ValueError(f"unknown synth format {format!r}; choose csv or wds")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    sal = spec.salience or PRESETS[spec.preset]
    meta = {"factors": FACTORS, "template": TEMPLATE, "preset": spec.preset, "salience": asdict(sal),
            "seed": spec.seed, "image_size": spec.image_size, "sizes": {"train": spec.train, "val": spec.val}}
    paths = {}
    for split_id, (split, n) in enumerate((("train", spec.train), ("val", spec.val))):
        if format == "wds":
            shards = [out / f"{split}-{s:06d}.tar" for s in range(max(-(-n // shard_size), 1))]
            paths[split] = out / f"{split}-{{000000..{len(shards) - 1:06d}}}.tar"
            done = all(p.exists() for p in shards)
        else:
            paths[split] = out / f"{split}.csv"
            done = paths[split].exists() and _count_rows(paths[split]) == n
        if done and (out / "factors.json").exists():
            continue
        samples = _samples(split, split_id, n, spec, sal)
        if format == "wds":
            _write_shards(shards, samples, shard_size)
        else:
            _write_csv(out, paths[split], split, samples)
    write_json(out / "factors.json", meta)
    return paths


def _samples(split: str, split_id: int, n: int, spec: SynthSpec, sal: Salience) -> Iterator[tuple[dict, bytes]]:
    """(factor values, PNG bytes) of each sample in order; both formats write exactly these."""
    rng = np.random.default_rng([spec.seed, split_id])
    for _ in tqdm(range(n), desc=f"synth {split}", unit="img", leave=False):
        values = {k: v[rng.integers(len(v))] for k, v in FACTORS.items()}
        img = render(values, sal, spec.image_size, rng)
        buf = io.BytesIO()
        Image.fromarray((img * 255).round().astype(np.uint8)).save(buf, format="PNG")
        yield values, buf.getvalue()


def _write_csv(out: Path, csv_path: Path, split: str, samples: Iterator[tuple[dict, bytes]]) -> None:
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (values, png) in enumerate(samples):
        rel = f"images/{split}/{i:06d}.png"
        (out / rel).write_bytes(png)
        rows.append({"filepath": rel, "title": caption(values), **values})
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filepath", "title", *FACTORS])
        writer.writeheader()
        writer.writerows(rows)


def _write_shards(shards: list[Path], samples: Iterator[tuple[dict, bytes]], shard_size: int) -> None:
    """Each shard written under a temp name and renamed when whole (a killed run never leaves half a shard)."""
    from webdataset import TarWriter
    it = enumerate(samples)
    for shard in shards:
        with atomic_path(shard) as tmp, TarWriter(str(tmp), mtime=0) as tar:  # int mtime: same bytes, no pax headers
            for i, (values, png) in itertools.islice(it, shard_size):
                tar.write({"__key__": f"{i:06d}", "png": png, "txt": caption(values).encode(),
                           "json": json.dumps(values).encode()})


def _count_rows(path: Path) -> int:
    with open(path, newline="") as f:
        return max(sum(1 for _ in csv.reader(f)) - 1, 0)
