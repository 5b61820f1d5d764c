"""Expert-usage statistics of one MoE layer, accumulated routing by routing over real tokens only.

Counts are kept per *item* (an image or a caption), not per group, so the group breakdown and its
chance level come out of the same pass: the mutual information between group and expert is compared
with the MI obtained after shuffling the item->group labels (a router that ignores the group).
Tokens of one item are not independent draws, so this permutation null is the honest chance level.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from moeclip.moe.router import Routing
from moeclip.moe.upcycle import moe_layers


def entropy_bits(p: np.ndarray) -> float:
    p = np.asarray(p, dtype=np.float64)
    p = p[p > 0] / p.sum() if p.sum() > 0 else p[p > 0]
    return float(-(p * np.log2(p)).sum()) if p.size else 0.0


def mutual_information(counts: np.ndarray) -> tuple[float, float, float]:
    """(MI, H(rows), H(columns)) in bits of the joint distribution given by a [G, E] count table."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    if total <= 0:
        return 0.0, 0.0, 0.0
    p = c / total
    pg, pe = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    mi = float((p[nz] * np.log2(p[nz] / (pg @ pe)[nz])).sum())
    return max(mi, 0.0), entropy_bits(pg.ravel()), entropy_bits(pe.ravel())


def normalised_mi(mi: float, h_groups: float, h_experts: float) -> float:
    """MI / min(H(group), H(expert)): 1 = the expert choice fully determines (or is fully determined by) the group."""
    bound = min(h_groups, h_experts)
    return float(mi / bound) if bound > 1e-12 else 0.0


class LayerStats:
    """Running counts for one MoE layer over `num_items` items (images or captions)."""

    def __init__(self, num_experts: int, num_items: int) -> None:
        self.num_experts = num_experts
        self.item_slots = np.zeros((num_items, num_experts), dtype=np.float64)  # routed slots per item
        self.top1 = np.zeros(num_experts, dtype=np.float64)
        self.prob_sum = np.zeros(num_experts, dtype=np.float64)
        self.coselect = np.zeros((num_experts, num_experts), dtype=np.float64)  # tokens choosing both i and j
        self.entropy_sum = 0.0
        self.tokens = 0
        self.top_k = 0

    def update(self, routing: Routing, mask: torch.Tensor | None, item_of_token: torch.Tensor) -> None:
        """routing over T tokens; mask: flat [T] bool of real tokens (None = all); item_of_token: long [T]."""
        experts, probs = routing.experts.detach(), routing.probs.detach().float()
        items = item_of_token.to(experts.device).long()
        if mask is not None:
            mask = mask.to(experts.device)
            experts, probs, items = experts[mask], probs[mask], items[mask]
        if experts.shape[0] == 0:
            return
        self.top_k = experts.shape[1]
        chosen = torch.zeros(experts.shape[0], self.num_experts, dtype=torch.float64, device=experts.device)
        chosen.scatter_(1, experts, 1.0)  # multi-hot [T, E]
        per_item = torch.zeros(self.item_slots.shape[0], self.num_experts, dtype=torch.float64,
                               device=experts.device).index_add_(0, items, chosen)
        self.item_slots += per_item.cpu().numpy()
        self.top1 += torch.bincount(experts[:, 0], minlength=self.num_experts).double().cpu().numpy()
        self.prob_sum += probs.sum(0).double().cpu().numpy()
        self.coselect += (chosen.t() @ chosen).cpu().numpy()
        self.entropy_sum += float(-(probs * torch.log2(probs.clamp_min(1e-30))).sum())
        self.tokens += int(experts.shape[0])

    def summary(self, item_groups: Sequence[int] | np.ndarray | None = None, num_groups: int = 0,
                null_permutations: int = 20, seed: int = 0) -> dict[str, Any]:
        """Loads, entropy, CV, co-selection; with `item_groups` (group id per item, -1 = not counted) the
        per-group expert shares and MI(group; expert) in bits against its permutation null."""
        e, n = self.num_experts, max(self.tokens, 1)
        slots = self.item_slots.sum(0)
        load = slots / max(slots.sum(), 1.0)
        mean = load.mean()
        out: dict[str, Any] = {
            "tokens": self.tokens,
            "load": _r(load), "top1": _r(self.top1 / n), "mean_prob": _r(self.prob_sum / n),
            "entropy_bits": round(self.entropy_sum / n, 4), "max_entropy_bits": round(math.log2(e), 4),
            "load_cv": round(float(load.std() / mean), 4) if mean > 0 else 0.0,
            "coselect": [_r(row) for row in self.coselect / n],
        }
        if item_groups is not None:
            out["groups"] = self._group_summary(np.asarray(item_groups, dtype=np.int64), num_groups,
                                                null_permutations, seed)
        return out

    def _group_summary(self, item_groups: np.ndarray, num_groups: int, permutations: int,
                       seed: int) -> dict[str, Any]:
        keep = (item_groups >= 0) & (self.item_slots.sum(1) > 0)
        slots, groups = self.item_slots[keep], item_groups[keep]
        g = max(num_groups, int(groups.max()) + 1 if groups.size else 0)
        counts = _by_group(slots, groups, g)
        mi, h_g, h_e = mutual_information(counts)
        rng = np.random.default_rng(seed)
        null = [mutual_information(_by_group(slots, rng.permutation(groups), g))[0] for _ in range(permutations)]
        share = counts / np.maximum(counts.sum(1, keepdims=True), 1.0)
        return {"share": [_r(row) for row in share], "tokens": _r(counts.sum(1) / max(self.top_k, 1), 1),
                "items": np.bincount(groups, minlength=g).tolist(),
                "mi_bits": round(mi, 5), "mi_norm": round(normalised_mi(mi, h_g, h_e), 5),
                "group_entropy_bits": round(h_g, 4), "expert_entropy_bits": round(h_e, 4),
                "mi_null_bits": round(float(np.mean(null)), 5) if null else None,
                "mi_null_p95_bits": round(float(np.quantile(null, 0.95)), 5) if null else None}


def last_routing_stats(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """{"<tower>.<block>": {load, entropy_bits}} of every MoE layer's last forward, over its real tokens:
    the cheap per-step view training logs show (layers that have not run yet are left out)."""
    out = {}
    for tower, block, layer in moe_layers(model):
        routing = layer.last_routing
        if routing is None:
            continue
        stats = LayerStats(layer.num_experts, 1)
        stats.update(routing, layer.last_mask, torch.zeros(routing.num_tokens, dtype=torch.long))
        summary = stats.summary()
        out[f"{tower}.{block}"] = {"load": summary["load"], "entropy_bits": summary["entropy_bits"]}
    return out


def _by_group(item_slots: np.ndarray, groups: np.ndarray, num_groups: int) -> np.ndarray:
    counts = np.zeros((num_groups, item_slots.shape[1]), dtype=np.float64)
    np.add.at(counts, groups, item_slots)
    return counts


def _r(values: Any, digits: int = 4) -> list[float]:
    return [round(float(v), digits) for v in np.asarray(values).ravel()]
