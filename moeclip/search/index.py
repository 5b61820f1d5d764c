"""Build a resumable image-embedding index: float16 memmap + path manifest + metadata.

Layout of an index folder:
  sources.json    every image the index covers, in order (fixed at the start; resume walks it again)
  embeddings.npy  float16 [num_sources, dim]; rows [0, count) are used, in manifest order
  paths.jsonl     one JSON string per embedded row: that row's image path
  progress.json   the last commit point (atomic): sources done, rows written, manifest bytes, skips
  index.json      written last, atomically: its presence means the index is complete

The bulk files are written in place and only trusted up to the last commit: a resumed run
truncates the manifest and overwrites embedding rows past the commit point, so a killed job
loses at most `commit_every` batches and a resumed index is identical to an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from moeclip.runtime import default_device
from torch import nn
from tqdm import tqdm

from moeclip import io
from moeclip.data.dataset import _reason
from moeclip.data.shards import load_keyed_image
from moeclip.search.sources import list_images


FORMAT = "moeclip-index"
FORMAT_VERSION = 1
SOURCES, EMBEDDINGS, MANIFEST, PROGRESS, META = "sources.json", "embeddings.npy", "paths.jsonl", \
    "progress.json", "index.json"


class _ImageFiles(torch.utils.data.Dataset):
    """Image i of the source list, preprocessed; an unreadable file is a skip with a reason, never a crash."""

    def __init__(self, paths: list[str], transform: Callable) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            return {"index": i, "image": self.transform(load_keyed_image(self.paths[i]))}
        except Exception as e:  # any unreadable image is a skip
            return {"index": i, "reason": _reason(e)}


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    good = [it for it in items if "image" in it]
    return {"index": [it["index"] for it in good], "last": max(it["index"] for it in items),
            "image": torch.stack([it["image"] for it in good]) if good else None,
            "skipped": [(it["index"], it["reason"]) for it in items if "image" not in it]}


def model_reference(name_or_path: str | os.PathLike) -> str:
    """What `moeclip search` will load: an absolute path for a model folder or a CLIP-MoE .pt file (so a search
    from another folder finds it), else the name as given."""
    p = Path(name_or_path)
    return str(p.resolve()) if p.is_dir() or p.is_file() else str(name_or_path)


def _start(out: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The committed progress to resume from (None = start fresh); refuse a folder holding something else."""
    if (out / META).exists():
        meta = io.read_json(out / META)
        if {k: meta.get(k) for k in key} != key:
            raise ValueError(f"{out}: already holds a complete index of {meta.get('images')} with model "
                             f"{meta.get('model')}; choose a new --out")
        return None
    if (out / PROGRESS).exists():
        state = io.read_json(out / PROGRESS)
        if {k: state.get(k) for k in key} != key:
            raise ValueError(f"{out}: holds an unfinished index of {state.get('images')} with model "
                             f"{state.get('model')}; re-run with those arguments to finish it, or choose a new --out")
        return state
    if out.exists():
        other = [p.name for p in out.iterdir() if p.name not in (SOURCES, EMBEDDINGS, MANIFEST)
                 and not p.name.startswith(".")]
        if other:
            raise ValueError(f"{out}: exists and is not a moeclip index (holds {other[0]}); choose a new --out")
    return {}


@torch.inference_mode()
def build_index(model: nn.Module, preprocess: Callable, images: str | os.PathLike, out: str | os.PathLike,
                model_ref: str, pretrained: str | None = None, batch_size: int = 64,
                device: str | torch.device | None = None, num_workers: int = 0, commit_every: int = 8,
                limit: int | None = None, progress: bool = True,
                image_root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Embed every image of `images` (folder, table or caption JSON) into the index folder `out`, resuming if it can.

    model_ref: how to load the model again at search time (see `model_reference`).
    image_root: where a table's or JSON's relative image paths start (default: its folder).
    limit: embed at most this many more source images, then stop (the index stays resumable).
    Returns the index metadata (`complete` False if stopped early) with this run's speed.
    """
    if batch_size < 1 or commit_every < 1:
        raise ValueError(f"batch_size and commit_every must be >= 1, got {batch_size} and {commit_every}")
    out = Path(out)
    key = {"model": model_ref, "pretrained": pretrained, "images": str(Path(images).absolute())}
    state = _start(out, key)
    if state is None:
        meta = io.read_json(out / META)
        return {**meta, "complete": True, "embedded_this_run": 0, "images_per_second": None}
    if state:
        sources = io.read_json(out / SOURCES)
    else:
        sources = list_images(images, image_root=image_root)
        io.write_json(out / SOURCES, sources)
        state = {**key, "num_sources": len(sources), "next": 0, "rows": 0, "manifest_bytes": 0,
                 "dim": None, "skipped": []}
    device = torch.device(device) if device is not None else default_device()
    model = model.to(device).eval()
    n = len(sources)
    stop = n if limit is None else min(n, state["next"] + max(limit, 0))
    batches = [list(range(a, min(a + batch_size, stop))) for a in range(state["next"], stop, batch_size)]
    loader = torch.utils.data.DataLoader(_ImageFiles(sources, preprocess), batch_sampler=batches,
                                         collate_fn=_collate, num_workers=num_workers)
    emb = None if state["dim"] is None else np.lib.format.open_memmap(out / EMBEDDINGS, mode="r+")
    with open(out / MANIFEST, "ab") as manifest:
        manifest.truncate(state["manifest_bytes"])  # drop lines written after the last commit
        manifest.seek(state["manifest_bytes"])

        def commit() -> None:
            if emb is not None:
                emb.flush()
            manifest.flush()
            os.fsync(manifest.fileno())
            io.write_json(out / PROGRESS, state)

        t0, done = time.perf_counter(), 0
        bar = tqdm(total=n, initial=state["next"], desc="index", unit="img", disable=not progress)
        try:
            for b, batch in enumerate(loader, start=1):
                if batch["image"] is not None:
                    feats = model.encode_image(batch["image"].to(device), normalize=True).float().cpu().numpy()
                    if emb is None:  # first batch of a fresh index: now the dim is known
                        state["dim"] = int(feats.shape[1])
                        emb = np.lib.format.open_memmap(out / EMBEDDINGS, mode="w+", dtype=np.float16,
                                                        shape=(n, state["dim"]))
                    r = state["rows"]
                    emb[r:r + len(feats)] = feats.astype(np.float16)
                    lines = "".join(manifest_line(sources[i]) for i in batch["index"]).encode()
                    manifest.write(lines)
                    state["rows"] += len(feats)
                    state["manifest_bytes"] += len(lines)
                    done += len(feats)
                state["skipped"] += [{"path": sources[i], "reason": why} for i, why in batch["skipped"]]
                bar.update(batch["last"] + 1 - state["next"])
                state["next"] = batch["last"] + 1
                if b % commit_every == 0:
                    commit()
        except KeyboardInterrupt:
            commit()  # counters only move after a whole batch is written: this commit is consistent
            raise
        finally:
            bar.close()
        commit()
    seconds = time.perf_counter() - t0
    speed = done / seconds if seconds > 0 and done else None
    if state["next"] < n:
        return {**state, "complete": False, "embedded_this_run": done, "images_per_second": speed}
    if state["rows"] == 0:
        raise ValueError(f"{images}: none of the {n} images could be read "
                         f"(e.g. {state['skipped'][0]['path']}: {state['skipped'][0]['reason']})")
    arch = getattr(model, "moeclip_arch", {}).get("arch")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **key, "arch": arch, "dim": state["dim"],
            "count": state["rows"], "num_sources": n, "dtype": "float16", "embeddings": EMBEDDINGS,
            "manifest": MANIFEST, "skipped": state["skipped"],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    io.write_json(out / META, meta)
    return {**meta, "complete": True, "embedded_this_run": done, "images_per_second": speed}


def manifest_line(path: str) -> str:
    """A manifest line: the path as a JSON string (any character in a file name survives)."""
    return json.dumps(path, ensure_ascii=False) + "\n"
