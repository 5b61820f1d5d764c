"""Embedding pass over a corpus: L2-normalised features written to float16 memory-mapped files
(`moeclip.mcl.store`: half the disk and page cache of float32, read back in chunks).

Images and captions are each encoded once (rows repeat them). The pass is split over every rank
(each encodes its share of a round on its own accelerator, under the runtime's autocast) and
gathered on rank 0, which writes the round and commits progress: a killed pass resumes where it
stopped, with any number of ranks, and memory stays bounded for any corpus size.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
from torch import nn
from tqdm import tqdm

from moeclip import io
from moeclip.data.dataset import CaptionDataset
from moeclip.model.encode import output_dim, sharded_image_features, sharded_text_features, unique_first
from moeclip.mcl.store import DTYPE, open_memmap
from moeclip.runtime import Runtime


def embed_corpus(model: nn.Module, dataset: CaptionDataset, tokenizer: Callable, out_dir: str | Path,
                 runtime: Runtime, batch_size: int = 512, commit_every: int = 8,
                 num_workers: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Collective: every rank calls it. Rank 0 gets per-row (image features, text features: float16,
    image_ok mask), read back from the memmaps; the other ranks get None. Rows whose image cannot be read get zero image
    features and `image_ok=False`; skips from every rank are recorded in progress.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(runtime.device).eval()
    paths, first_rows, image_of_row = unique_first(dataset.paths)
    captions, first_caption_rows, caption_of_row = unique_first(dataset.captions)
    dim = output_dim(model, runtime)
    progress_path = out / "progress.json"
    progress = io.read_json(progress_path) if progress_path.exists() else {}
    runtime.barrier()  # every rank has read the same progress before rank 0 may rewrite it
    sizes = {"num_images": len(paths), "num_captions": len(captions), "dim": dim, "dtype": "float16"}
    if progress and "dtype" not in progress:
        raise ValueError(f"{out}: float32 features from an older version; delete the folder to re-embed")
    if any(progress.get(k) not in (None, v) for k, v in sizes.items()):
        raise ValueError(f"{out}: features from another corpus or model; delete the folder to re-embed")
    fresh = not progress
    img = _memmap(out / "image.f16", len(paths), dim, fresh, runtime)
    ok = _memmap(out / "image_ok.u8", len(paths), 1, fresh, runtime, dtype=np.uint8)
    txt = _memmap(out / "text.f16", len(captions), dim, fresh, runtime)
    state = {**sizes, "images_done": progress.get("images_done", 0), "texts_done": progress.get("texts_done", 0),
             "skipped": progress.get("skipped", {})}
    chunk = batch_size * commit_every * runtime.world_size
    skips_at_start, resumed_skips = Counter(dataset.skips.counts), dict(state["skipped"])

    bar = tqdm(total=len(paths), initial=state["images_done"], desc="embed images", unit="img", leave=False,
               disable=not runtime.is_main)
    for start in range(state["images_done"], len(paths), chunk):
        end = min(start + chunk, len(paths))
        feats, loaded = sharded_image_features(model, dataset, first_rows[start:end].tolist(), batch_size, runtime,
                                               num_workers)
        state["skipped"] = _all_skips(runtime, dataset, skips_at_start, resumed_skips)
        if runtime.is_main:
            img[start:end] = feats.float().numpy()
            ok[start:end, 0] = loaded.numpy().astype(np.uint8)
            img.flush(); ok.flush()  # features on disk before progress claims them
            io.write_json(progress_path, {**state, "images_done": end})
        state["images_done"] = end
        bar.update(end - start)
    bar.close()
    text_chunk = batch_size * 4 * commit_every * runtime.world_size
    for start in range(state["texts_done"], len(captions), text_chunk):
        end = min(start + text_chunk, len(captions))
        feats = sharded_text_features(model, tokenizer, captions[start:end], batch_size, runtime)
        if runtime.is_main:
            txt[start:end] = feats.float().numpy()
            txt.flush()
            io.write_json(progress_path, {**state, "texts_done": end})
        state["texts_done"] = end
    if runtime.is_main:
        io.write_json(progress_path, state)
    runtime.barrier()
    if not runtime.is_main:
        return None
    return np.asarray(img[image_of_row]), np.asarray(txt[caption_of_row]), np.asarray(ok[image_of_row, 0] == 1)


def _all_skips(runtime: Runtime, dataset: CaptionDataset, at_start: Counter, resumed: dict[str, int]) -> dict[str, int]:
    """Skips of this pass on every rank (each rank's log holds only the images it read), plus those a killed
    earlier pass had committed."""
    total = Counter(resumed)
    for counts in runtime.gather_objects(dict(dataset.skips.counts - at_start)):
        total.update(counts)
    return dict(sorted(total.items()))


def _memmap(path: Path, n: int, dim: int, fresh: bool, runtime: Runtime, dtype=DTYPE) -> np.memmap | None:
    """Rank 0 owns the files; the others never open them."""
    if not runtime.is_main:
        return None
    return open_memmap(path, n, dim, "w+" if fresh or not path.exists() else "r+", dtype)
