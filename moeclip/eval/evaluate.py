"""`moeclip eval`: retrieval, optional zero-shot classification, and the per-factor probe in one pass
over the images (each image is encoded once)."""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from moeclip import io
from moeclip.data.dataset import DataError
from moeclip.data.formats import has_factor_columns, open_dataset
from moeclip.eval.probe import factor_probe
from moeclip.eval.retrieval import DEFAULT_PROTOCOL, check_protocol, protocol_pairs, retrieval_metrics
from moeclip.eval.zeroshot import DEFAULT_TEMPLATES, zero_shot
from moeclip.model.encode import sharded_image_features, sharded_text_features, unique_first
from moeclip.runtime import Runtime

log = logging.getLogger(__name__)


def find_factors(table: str | Path) -> dict[str, Any] | None:
    """A synthetic corpus describes its factors in factors.json beside its CSVs (or shards)."""
    path = Path(table).parent / "factors.json"
    return io.read_json(path) if path.exists() else None


@torch.no_grad()
def evaluate(model: nn.Module, preprocess: Callable, tokenizer: Callable, table: str | Path,
             class_column: str | None = None, templates: Sequence[str] = DEFAULT_TEMPLATES,
             classnames: Sequence[str] | None = None,
             factors: dict[str, Any] | None = None, batch_size: int = 256, runtime: Runtime | None = None,
             num_workers: int = 0, progress: bool = True, split: str = "test",
             image_root: str | Path | None = None, protocol: str = DEFAULT_PROTOCOL) -> dict[str, Any]:
    """`table`: CSV/TSV, a Karpathy-split caption JSON (`split` applies to that only) or a ShareGPT4V JSON;
    relative image paths start at `image_root` (default: the file's folder).

    Collective under a multi-rank runtime: every rank encodes its share of the images and captions on its
    device (under the runtime's autocast), the features are gathered, and every rank returns the same
    metrics, equal to a one-process run's. `runtime` None = one process on the first accelerator.
    class_column: also classify each image zero-shot by that column (`moeclip.eval.zeroshot`), against
    `classnames` (None = the column's distinct values) with `templates`.
    protocol: which rows are positives (`moeclip.eval.retrieval`): `per_caption` (every caption row its own
    query, as papers and CLIP_benchmark count) or `multi_positive` (identical captions merged); recorded in
    the metrics.
    """
    check_protocol(protocol)
    rt = runtime or Runtime.local()
    model = model.to(rt.device).eval()
    ds = open_dataset(table, preprocess, split=split, image_root=image_root)
    paths, first_rows, image_of_row = unique_first(ds.paths)
    captions, _, caption_of_row = unique_first(ds.captions)

    read_skips = Counter(ds.skips.counts)  # found while reading the table: every rank found the same
    feats, loaded = sharded_image_features(model, ds, first_rows.tolist(), batch_size, rt, num_workers, progress)
    skipped = _all_skips(rt, read_skips, ds.skips.counts - read_skips)
    loaded_img = np.flatnonzero(loaded.numpy())
    if loaded_img.size == 0:
        raise DataError(f"{table}: no image could be read ({ds.skips.summary()})")
    image_features = feats[torch.as_tensor(loaded_img)]
    # keep only rows whose image loaded; renumber images densely
    img_new = np.full(len(paths), -1, dtype=np.int64)
    img_new[loaded_img] = np.arange(len(loaded_img))
    ok = img_new[image_of_row] >= 0
    used_caps = np.unique(caption_of_row[ok])
    text_features = sharded_text_features(model, tokenizer, [captions[i] for i in used_caps], batch_size * 2, rt)
    cap_new = np.full(len(captions), -1, dtype=np.int64)
    cap_new[used_caps] = np.arange(len(used_caps))
    image_ids, text_ids, caption_of_item = protocol_pairs(protocol, img_new[image_of_row[ok]],
                                                          cap_new[caption_of_row[ok]])
    metrics: dict[str, Any] = {"protocol": protocol, **retrieval_metrics(
        image_features, text_features[torch.as_tensor(caption_of_item)], image_ids, text_ids)}
    metrics.update(num_images=int(image_features.shape[0]), num_captions=int(len(used_caps)),
                   num_rows=int(ok.sum()), skipped=skipped)

    rows_of_image = [ds.rows[first_rows[i]] for i in loaded_img]
    if class_column:
        if class_column not in rows_of_image[0]:
            raise DataError(f"{table}: no class column '{class_column}'")
        metrics["zeroshot"] = zero_shot(model, tokenizer, image_features,
                                        [r[class_column] for r in rows_of_image], templates, rt, classnames,
                                        where=f"{table} column '{class_column}'")
    if factors is None and has_factor_columns(table):
        factors = find_factors(table)
    if factors:
        missing = [f for f in factors["factors"] if f not in ds.rows[0]]
        if missing:
            raise DataError(f"{table}: factors.json names factor column(s) {missing} the table lacks")
        probe = factor_probe(model, tokenizer, image_features, rows_of_image, factors["factors"],
                             factors["template"], rt)
        metrics["factors"] = {k: v["accuracy"] for k, v in probe.items()}
        metrics["factors_chance"] = {k: v["chance"] for k, v in probe.items()}
    if skipped and rt.is_main:
        log.warning("%s: skipped %s", table, ", ".join(f"{n} {r}" for r, n in skipped.items()))
    return metrics


def _all_skips(runtime: Runtime, read: Counter, loading: Counter) -> dict[str, int]:
    """Table rows skipped once (every rank read the whole table) plus the images each rank failed to load
    (each rank loaded only its share)."""
    total = Counter(read)
    for c in runtime.gather_objects(dict(loading)):
        total.update(c)
    return dict(sorted(total.items()))


def format_table(metrics: dict[str, Any]) -> str:
    """Markdown table of `evaluate`'s metrics, or of `evaluate_zeroshot`'s (zero-shot keys at the top level)."""
    if "top1" in metrics:
        metrics = {"zeroshot": metrics, "skipped": metrics.get("skipped")}
    lines = ["| metric | value |", "|---|---|"]
    for k in ("image_to_text_R@1", "image_to_text_R@5", "image_to_text_R@10",
              "text_to_image_R@1", "text_to_image_R@5", "text_to_image_R@10", "mean_R@1"):
        if k in metrics:
            lines.append(f"| {k} | {100 * metrics[k]:.1f} |")
    for k, v in metrics.get("factors", {}).items():
        lines.append(f"| factor {k} (chance {100 * metrics['factors_chance'][k]:.0f}) | {100 * v:.1f} |")
    for k, v in metrics.get("zeroshot", {}).items():
        if k in ("top1", "top5", "mean_per_class_recall"):
            lines.append(f"| zero-shot {k} ({metrics['zeroshot']['num_classes']} classes) | {100 * v:.1f} |")
    if "num_captions" in metrics:
        lines.append(f"| images / captions | {metrics['num_images']} / {metrics['num_captions']} |")
    if "protocol" in metrics:
        queries = metrics["num_rows"] if metrics["protocol"] == "per_caption" else metrics["num_captions"]
        lines.append(f"| retrieval protocol | {metrics['protocol']} ({queries} text queries) |")
    else:
        lines.append(f"| images | {metrics['zeroshot']['num_images']} |")
    if metrics.get("skipped"):
        lines.append(f"| skipped | {', '.join(f'{n} {r}' for r, n in metrics['skipped'].items())} |")
    return "\n".join(lines)
