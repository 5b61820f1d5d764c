"""Embedding pass over a corpus: L2-normalised features written to memory-mapped files.

Images and captions are each encoded once (rows repeat them); progress is committed every few
batches, so a killed pass resumes where it stopped and memory stays bounded for any corpus size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from moeclip import io
from moeclip.data.dataset import CaptionDataset
from moeclip.model.encode import encode_texts, iter_image_batches, unique_first


def embed_corpus(model: nn.Module, dataset: CaptionDataset, tokenizer: Callable, out_dir: str | Path,
                 batch_size: int = 512, device: str | torch.device = "cpu", commit_every: int = 8,
                 num_workers: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return per-row (image features, text features, image_ok mask), read back from the memmaps.

    Rows whose image cannot be read get zero image features and `image_ok=False`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(device).eval()
    paths, first_rows, image_of_row = unique_first([r["_path"] for r in dataset.rows])
    captions, _, caption_of_row = unique_first(dataset.captions)
    dim = _output_dim(model, tokenizer, device)
    progress_path = out / "progress.json"
    progress = io.read_json(progress_path) if progress_path.exists() else {}
    if progress.get("num_images") not in (None, len(paths)) or progress.get("dim") not in (None, dim):
        raise ValueError(f"{out}: features from another corpus or model; delete the folder to re-embed")

    img = _memmap(out / "image.f32", len(paths), dim, fresh=not progress)
    ok = _memmap(out / "image_ok.u8", len(paths), 1, fresh=not progress, dtype=np.uint8)
    done = progress.get("images_done", 0)
    chunk = batch_size * commit_every
    bar = tqdm(total=len(paths), initial=done, desc="embed images", unit="img", leave=False)
    for start in range(done, len(paths), chunk):
        for rows, feats in iter_image_batches(model, dataset, first_rows[start:start + chunk], batch_size,
                                              device, num_workers, progress=False):
            uid = image_of_row[rows.numpy()]
            img[uid] = feats.numpy()
            ok[uid] = 1
        img.flush(); ok.flush()  # features on disk before progress claims them
        done = min(start + chunk, len(paths))
        io.write_json(progress_path, {"num_images": len(paths), "dim": dim, "images_done": done})
        bar.update(done - start)
    bar.close()
    if not progress.get("texts_done"):
        txt = encode_texts(model, tokenizer, captions, batch_size, device, progress=True).numpy()
        io.save_npy(out / "text.npy", txt)
    io.write_json(progress_path, {"num_images": len(paths), "dim": dim, "images_done": done, "texts_done": True,
                                  "skipped": dict(dataset.skips.counts)})
    txt = io.load_npy(out / "text.npy", mmap=True)
    return np.asarray(img[image_of_row]), np.asarray(txt[caption_of_row]), np.asarray(ok[image_of_row, 0] == 1)


def _memmap(path: Path, n: int, dim: int, fresh: bool, dtype=np.float32) -> np.memmap:
    mode = "w+" if fresh or not path.exists() else "r+"
    return np.memmap(path, dtype=dtype, mode=mode, shape=(n, dim))


@torch.no_grad()
def _output_dim(model: nn.Module, tokenizer: Callable, device) -> int:
    return int(model.encode_text(tokenizer(["a"]).to(device)).shape[-1])
