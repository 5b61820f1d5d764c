"""Image<->text retrieval recall over positive (query, gallery) pairs, computed in chunks (memory stays bounded).

A query counts as a hit at k when *any* of its positives is in its top k. Which rows are positives is the
evaluation protocol (`PROTOCOLS`), chosen by `protocol_pairs`:

- `per_caption` (the default; COCO/Flickr30k papers, open_clip, LAION's CLIP_benchmark `zeroshot_retrieval`):
  every caption row is its own text query and its own gallery item, even when its string repeats elsewhere;
  its image is its only positive; an image's positives are its caption rows.
- `multi_positive`: rows with the same caption string collapse to one text item whose positives are every image
  it describes (how synthetic tables, whose captions repeat by design, were scored before; docs/usage.md).
"""
from __future__ import annotations

import numpy as np
import torch

PROTOCOLS = ("per_caption", "multi_positive")
DEFAULT_PROTOCOL = "per_caption"


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"retrieval protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    return protocol


def protocol_pairs(protocol: str, image_of_row: np.ndarray,
                   caption_of_row: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (image id, distinct-caption id) -> (image id per row, text item per row, distinct caption of each
    text item): the text gallery is `caption_features[caption_of_item]`. per_caption makes every row its own
    text item (a repeated string is encoded once, then copied); multi_positive keeps one item per string."""
    if check_protocol(protocol) == "per_caption":
        return image_of_row, np.arange(len(caption_of_row)), caption_of_row
    return image_of_row, caption_of_row, np.arange(int(caption_of_row.max()) + 1 if len(caption_of_row) else 0)


def recall_at_k(query: torch.Tensor, gallery: torch.Tensor, q_idx: np.ndarray, g_idx: np.ndarray,
                ks: tuple[int, ...] = (1, 5, 10), chunk: int = 1024) -> dict[int, float]:
    """`(q_idx[j], g_idx[j])` are the positive pairs; returns {k: fraction of queries hit}."""
    order = np.argsort(q_idx, kind="stable")
    q_sorted, g_sorted = q_idx[order], g_idx[order]
    kmax = min(max(ks), gallery.shape[0])
    hits = {k: 0 for k in ks}
    for a in range(0, query.shape[0], chunk):
        b = min(a + chunk, query.shape[0])
        lo, hi = np.searchsorted(q_sorted, a), np.searchsorted(q_sorted, b)
        pos = torch.zeros(b - a, gallery.shape[0], dtype=torch.bool)
        pos[torch.as_tensor(q_sorted[lo:hi] - a), torch.as_tensor(g_sorted[lo:hi])] = True
        top = (query[a:b] @ gallery.t()).topk(kmax, dim=1).indices
        found = pos.gather(1, top)
        for k in ks:
            hits[k] += int(found[:, :k].any(dim=1).sum())
    return {k: hits[k] / query.shape[0] for k in ks}


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, image_of_pair: np.ndarray,
                      caption_of_pair: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    i2t = recall_at_k(image_features, text_features, image_of_pair, caption_of_pair, ks)
    t2i = recall_at_k(text_features, image_features, caption_of_pair, image_of_pair, ks)
    out = {f"image_to_text_R@{k}": v for k, v in i2t.items()}
    out.update({f"text_to_image_R@{k}": v for k, v in t2i.items()})
    out["mean_R@1"] = 0.5 * (i2t[ks[0]] + t2i[ks[0]]) if 1 in ks else float("nan")
    return out
