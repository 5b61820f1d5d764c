"""Query a finished index by text or by image: embed the query with the index's own model, then an
exact chunked top-k over the memory-mapped embeddings (memory stays bounded for any index size)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from moeclip.runtime import default_device
from torch import nn

from moeclip import io
from moeclip.data.dataset import load_image
from moeclip.search.index import FORMAT, META, PROGRESS
from moeclip.search.store import NpyRows
from moeclip.search.topk import chunked_topk


@dataclass
class Index:
    """An opened index: metadata plus on-demand row access to the float16 embeddings (nothing loaded)."""
    root: Path
    meta: dict[str, Any]
    embeddings: NpyRows

    @property
    def count(self) -> int:
        return int(self.meta["count"])

    def paths(self, rows: Iterable[int]) -> dict[int, str]:
        """Manifest paths of the given rows, streaming the manifest once (no full load)."""
        want = set(int(r) for r in rows)
        found: dict[int, str] = {}
        with open(self.root / self.meta["manifest"], encoding="utf-8") as f:
            for row, line in enumerate(f):
                if row in want:
                    found[row] = json.loads(line)
                    if len(found) == len(want):
                        break
        missing = want - set(found)
        if missing:
            raise ValueError(f"{self.root / self.meta['manifest']}: has no line for row {min(missing)}; "
                             "the index is damaged, rebuild it")
        return found


def open_index(path: str | os.PathLike) -> Index:
    root = Path(path)
    if not (root / META).exists():
        if (root / PROGRESS).exists():
            state = io.read_json(root / PROGRESS)
            raise ValueError(f"{root}: unfinished index ({state.get('next')} of {state.get('num_sources')} "
                             "images done); re-run `moeclip index` with the same arguments to finish it")
        raise FileNotFoundError(f"{root}: no {META}; not a moeclip index (build one with `moeclip index`)")
    meta = io.read_json(root / META)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{root / META}: 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    emb = NpyRows(root / meta["embeddings"])
    if emb.shape[1] != meta["dim"] or emb.shape[0] < meta["count"]:
        raise ValueError(f"{root / meta['embeddings']}: shape {emb.shape} does not match {META} "
                         f"(count {meta['count']}, dim {meta['dim']}); rebuild the index")
    return Index(root, meta, emb)


def load_index_model(index: Index, device: str | torch.device | None = None) -> tuple[nn.Module, Callable, Callable]:
    from moeclip import load
    return load(index.meta["model"], pretrained=index.meta.get("pretrained"), device=device)


@torch.inference_mode()
def embed_query(model: nn.Module, preprocess: Callable, tokenizer: Callable, text: str | None = None,
                image: str | os.PathLike | None = None, device: str | torch.device | None = None) -> torch.Tensor:
    """[1, dim] normalised query embedding; exactly one of text / image."""
    device = torch.device(device) if device is not None else default_device()
    if (text is None) == (image is None):
        raise ValueError("give exactly one query: --text or --image")
    if text is not None:
        return model.encode_text(tokenizer([text]).to(device), normalize=True).float().cpu()
    try:
        img = load_image(image)
    except Exception as e:
        raise ValueError(f"{image}: cannot read the query image ({e})") from None
    return model.encode_image(preprocess(img)[None].to(device), normalize=True).float().cpu()


def search(index: Index, query: torch.Tensor, k: int = 10, chunk_rows: int = 32768) -> list[dict[str, Any]]:
    """Ranked results `{rank, score, path, row}` for one query embedding [dim] or [1, dim]."""
    if query.shape[-1] != index.meta["dim"]:
        raise ValueError(f"the query embedding has dim {query.shape[-1]}, the index {index.root} has "
                         f"dim {index.meta['dim']}: was it built with another model?")
    scores, rows = chunked_topk(index.embeddings, query.reshape(1, -1), k, chunk_rows, count=index.count)
    rows_list = rows[0].tolist()
    paths = index.paths(rows_list)
    return [{"rank": r + 1, "score": round(float(s), 4), "path": paths[row], "row": row}
            for r, (s, row) in enumerate(zip(scores[0].tolist(), rows_list))]
