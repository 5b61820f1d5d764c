"""Cluster-specialist experts (c-BTM, Gururangan et al. 2023; CLIP-FMoE's isolated contrastive learning).

Where MCL's stages run one after another, each re-clustering with the previous stage's model, here the
corpus is partitioned once by k-means on the base's joint image+text features, and expert p's FFNs are
fine-tuned from the base on partition p alone. No specialist waits for another (at scale: one per GPU), and
each sees only its own part of the data, so experts differ by construction. Expert 0 stays the base.
The partition's centroids later seed the routers (`init_routers_from_partitions`).

Files follow MCL's layout (stage_{p}/ffn.safetensors + stage.json, partition in stage_0/), so resuming,
reports and `mcl_dir` reuse work unchanged.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from moeclip import io
from moeclip.data.dataset import CaptionDataset
from moeclip.model.ffn import ffn_distance, ffn_param_names, ffn_state_dict
from moeclip.moe import moe_layers
from moeclip.runtime import Runtime
from moeclip.train.loop import require_finished, train

log = logging.getLogger(__name__)


def run_specialists(base: nn.Module, dataset: CaptionDataset, tokenizer: Callable, cfg, out: Path,
                    runtime: Runtime, seed: int, factor_columns: dict[str, list[str]] | None,
                    cluster: Callable) -> list[dict[str, torch.Tensor]]:
    """FFN weight sets of experts 0..num_experts-1: the base, then one specialist per k-means partition.

    cfg: the MCLConfig (train, towers, blocks, num_experts); cluster: mcl_stages' embed-and-cluster step.
    """
    parts = cfg.num_experts - 1
    pcfg = dataclasses.replace(cfg, cluster_features="joint", group_size=None, k_img=parts, k_txt=1, min_group=1)
    t0 = time.time()
    partition, _, clusters = cluster(base, ffn_state_dict(base, cfg.towers, cfg.blocks), dataset, tokenizer, pcfg,
                                     out / "stage_0", runtime, seed, None, factor_columns, None)
    t_cluster = time.time() - t0
    names = ffn_param_names(base, cfg.towers, cfg.blocks)
    experts = [ffn_state_dict(base, cfg.towers, cfg.blocks)]
    for p in range(parts):
        sdir = out / f"stage_{p + 1}"
        if (sdir / "stage.json").exists() and (sdir / "ffn.safetensors").exists():
            experts.append(io.load_tensors(sdir / "ffn.safetensors"))
            continue
        rows = np.flatnonzero(partition == p)
        model = copy.deepcopy(base)
        tcfg = copy.deepcopy(cfg.train)
        tcfg.seed = seed + p + 1
        result = train(model, dataset.subset(rows), tokenizer, tcfg, sdir / "train", runtime, trainable=names,
                       desc=f"specialist {p + 1} ({len(rows)} rows)")
        require_finished(result, tcfg, f"specialist {p + 1}")
        ffn = ffn_state_dict(model, cfg.towers, cfg.blocks)
        del model
        experts.append(ffn)
        summary = {"stage": p + 1, "construction": "specialists", "config": dataclasses.asdict(cfg),
                   "clusters": {**clusters, "partition": p, "partition_rows": int(len(rows))}, "train": result,
                   "seconds": {"embed_and_cluster": round(t_cluster, 2) if p == 0 else 0.0,
                               "train": result["seconds"]},
                   "distance_to_experts": [round(ffn_distance(ffn, e), 5) for e in experts[:-1]]}
        if runtime.is_main:
            io.save_tensors(sdir / "ffn.safetensors", ffn, metadata={"stage": p + 1})
            io.write_json(sdir / "stage.json", summary)
        runtime.barrier()
        log.info("specialist %d: %d rows, distance to earlier experts %s", p + 1, len(rows),
                 summary["distance_to_experts"])
    return experts


@torch.no_grad()
def init_routers_from_partitions(model: nn.Module, dataset: CaptionDataset, partition: np.ndarray,
                                 collate: Callable, runtime: Runtime, rows_per_part: int = 64, seed: int = 0) -> None:
    """Point each router's row p+1 at partition p's mean FFN input in that layer (relative to all partitions'
    mean), scaled so a token at that mean scores 1 more for its specialist than the average token; expert 0
    (the base) keeps its row. The c-BTM idea, carried from example embeddings to each layer's tokens."""
    rng = np.random.default_rng(seed)
    parts = int(partition.max()) + 1
    layers = moe_layers(model)
    sums: dict[int, list[torch.Tensor]] = {}
    hooks = []
    for i, (_, _, layer) in enumerate(layers):
        def grab(module, args, i=i):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            mask = module._real_token_mask(args[0].shape[:-1], x.device)
            sums.setdefault(i, []).append((x[mask] if mask is not None else x).mean(0))
        hooks.append(layer.register_forward_pre_hook(grab))
    model.to(runtime.device).eval()
    means: list[list[torch.Tensor | None]] = []
    try:
        for p in range(parts):
            rows = np.flatnonzero(partition == p)
            rows = rng.choice(rows, size=min(rows_per_part, len(rows)), replace=False)
            batch = collate([dataset[int(r)] for r in rows])
            sums.clear()
            with runtime.autocast():
                if "image" in batch:
                    model.encode_image(batch["image"].to(runtime.device))
                model.encode_text(batch["text"].to(runtime.device))
            means.append([torch.stack(sums[i]).mean(0) if i in sums else None for i in range(len(layers))])
    finally:
        for h in hooks:
            h.remove()
    for i, (_, _, layer) in enumerate(layers):
        if any(means[p][i] is None for p in range(parts)):
            log.warning("router %d: a partition had no readable sample; its router keeps its random init", i)
            continue
        m = torch.stack([means[p][i] for p in range(parts)])  # [parts, d]
        direction = m - m.mean(0, keepdim=True)
        w = direction / direction.pow(2).sum(1, keepdim=True).clamp_min(1e-12)
        layer.router.proj.weight[1:parts + 1] = w.to(layer.router.proj.weight)
