"""Which experts an MoE CLIP uses, and for what: one no-grad pass over a captioned table.

Every MoE layer keeps its last forward's routing (`last_routing`, `last_mask`); after each batch the
routings are folded into per-layer counts (real tokens only: text padding never counts). The image
tower sees each distinct image once, the text tower every caption row; each token is attributed to
its image or caption, whose value in the `group_by` column gives the group breakdown.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from moeclip.analysis.stats import LayerStats
from moeclip.data.dataset import CaptionDataset, Collate, DataError, record_skips
from moeclip.model.encode import unique_first
from moeclip.model.ffn import tower_prefix
from moeclip.moe import moe_layers
from moeclip.runtime import Runtime

log = logging.getLogger(__name__)

MAX_PLOTTED_GROUPS = 40


def open_table(table: str | Path | CaptionDataset, transform: Callable | None, split: str = "test",
               image_root: str | Path | None = None) -> CaptionDataset:
    if isinstance(table, CaptionDataset):
        return table
    from moeclip.data.formats import open_dataset
    return open_dataset(table, transform, split=split, image_root=image_root)


def _sample_of_token(model: nn.Module, tower: str, num_tokens: int, batch: int) -> torch.Tensor:
    """Sample index of each flattened token: blocks see [B, L, d] (batch_first) or [L, B, d]."""
    if num_tokens % batch:
        raise ValueError(f"{tower} MoE layer saw {num_tokens} tokens for a batch of {batch}")
    per = num_tokens // batch
    transformer = model.get_submodule(tower_prefix(model, tower).rsplit(".", 1)[0])
    if getattr(transformer, "batch_first", True):
        return torch.arange(batch).repeat_interleave(per)
    return torch.arange(batch).repeat(per)


@torch.inference_mode()
def analyse_experts(model: nn.Module, preprocess: Callable, tokenizer: Callable,
                    table: str | Path | CaptionDataset, group_by: str | None = None, max_rows: int = 2048,
                    batch_size: int = 64, runtime: Runtime | None = None, progress: bool = True,
                    null_permutations: int = 20, split: str = "test",
                    image_root: str | Path | None = None) -> dict[str, Any]:
    """Per tower x MoE layer: expert load, top-1 share, mean router probability, routing entropy, load CV,
    co-selection matrix; with `group_by`, expert share per group and MI(group; expert) against chance.

    table: CSV/TSV, Karpathy .json (`split`) or ShareGPT4V .json path (relative images from `image_root`), or an
    open CaptionDataset; the first `max_rows` rows.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layers; expert analysis needs an MoE model (see moeclip.upcycle)")
    rt = runtime or Runtime.local()
    model = model.to(rt.device).eval()
    ds = open_table(table, preprocess, split, image_root)
    rows = ds.rows[:max_rows] if max_rows else ds.rows
    if group_by is not None and group_by not in rows[0]:
        cols = [c for c in rows[0] if not c.startswith("_")]
        raise DataError(f"{ds.table}: no column '{group_by}' to group by; columns are {cols}")
    paths, first_rows, _ = unique_first([r["_path"] for r in rows])
    stats = {(t, b): LayerStats(layer.num_experts, len(paths) if t == "visual" else len(rows))
             for t, b, layer in layers}
    towers = {t for t, _, _ in layers}

    loaded = np.zeros(len(paths), dtype=bool)
    if "visual" in towers:
        collate = Collate(None)
        image_items = list(range(len(paths)))
        for a in tqdm(range(0, len(paths), batch_size), desc="experts: images", disable=not progress, leave=False):
            batch = collate([ds[int(first_rows[i])] for i in image_items[a:a + batch_size]])
            record_skips(batch, ds.skips)
            if "image" not in batch:
                continue
            item = torch.as_tensor(np.searchsorted(first_rows, batch["index"].numpy()))
            loaded[item.numpy()] = True
            with rt.autocast():
                model.encode_image(batch["image"].to(rt.device))
            _fold(model, layers, stats, "visual", item)
    if "text" in towers:
        for a in tqdm(range(0, len(rows), batch_size), desc="experts: captions", disable=not progress, leave=False):
            captions = [r["_caption"] for r in rows[a:a + batch_size]]
            with rt.autocast():
                model.encode_text(tokenizer(captions).to(rt.device))
            _fold(model, layers, stats, "text", torch.arange(a, a + len(captions)))

    names, item_groups = None, {}
    if group_by is not None:
        values = [r[group_by] or "(empty)" for r in rows]
        names = sorted(set(values))
        gid = {v: i for i, v in enumerate(names)}
        row_groups = np.array([gid[v] for v in values], dtype=np.int64)
        img_groups = row_groups[first_rows].copy()
        img_groups[~loaded] = -1
        item_groups = {"visual": img_groups, "text": row_groups}
        if len(names) > MAX_PLOTTED_GROUPS:
            log.warning("'%s' has %d groups; the heatmaps show the %d largest", group_by, len(names),
                        MAX_PLOTTED_GROUPS)
    first = layers[0][2]
    out: dict[str, Any] = {
        "data": str(ds.table), "rows": len(rows), "images": int(loaded.sum()) if "visual" in towers else None,
        "captions": len(rows), "skipped": dict(ds.skips.counts), "group_by": group_by, "groups": names,
        "num_experts": first.num_experts, "top_k": first.top_k, "null_permutations": null_permutations,
        "layers": [],
    }
    for t, b, layer in layers:
        s = stats[(t, b)].summary(item_groups.get(t), len(names or []), null_permutations, seed=b)
        out["layers"].append({"tower": t, "block": b, "num_experts": layer.num_experts, "top_k": layer.top_k, **s})
    if ds.skips.counts:
        log.warning("%s: %s", ds.table, ds.skips.summary())
    return out


def _fold(model: nn.Module, layers: list, stats: dict, tower: str, item_of_sample: torch.Tensor) -> None:
    """Add the routing each `tower` layer just produced; sample s of the batch is item `item_of_sample[s]`."""
    for t, b, layer in layers:
        routing = layer.last_routing
        if t != tower or routing is None:
            continue
        sample = _sample_of_token(model, t, routing.num_tokens, len(item_of_sample))
        mask = layer.last_mask
        stats[(t, b)].update(routing, mask, item_of_sample[sample])
        layer.last_routing = None  # a stale routing must never be counted twice
