"""Shrinking a trained MoE CLIP: merge each MoE layer back into one dense FFN, or drop its least-used experts.

Plain torch, given per-layer expert loads (measured elsewhere, e.g. `moeclip.analysis.analyse_experts`):
- `merge_to_dense`: each MoE FFN becomes one FFN whose parameters are the (load-)weighted average of its
  experts' parameters, so the model has the dense base's size and runs anywhere a dense open_clip CLIP does.
  Averaging parameters is not averaging outputs (the activation sits between `c_fc` and `c_proj`); it is exact
  only when the experts agree, which is why the command line measures what each merge keeps.
- `prune_experts`: keep the K most-used experts of every layer; the router keeps their rows (its softmax and
  top-k then run over the survivors), top-k becomes min(top-k, K).
Both work in place on local experts (an expert-parallel model is consolidated first: `moeclip consolidate`).
"""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
from torch import nn

from ..model.ffn import tower_blocks
from .layer import LocalExperts, MoEFFN
from .router import TopKRouter
from .upcycle import _install_text_mask_hook, moe_layers

LayerKey = tuple[str, int]  # (tower, block)


def _local_experts(layer: MoEFFN, where: str) -> LocalExperts:
    if layer.shared is not None:
        raise ValueError(f"{where}: the layer has a shared expert behind a gate; merging or pruning "
                         "such layers is not supported")
    if not isinstance(layer.experts, LocalExperts):
        raise ValueError(f"{where}: experts are not local ({type(layer.experts).__name__}); consolidate the "
                         "model into one directory first (moeclip consolidate)")
    return layer.experts


def _weights(loads: Mapping[LayerKey, Sequence[float]] | None, key: LayerKey, num_experts: int) -> torch.Tensor:
    """Normalised weights for one layer; None (or no entry) = equal weights."""
    where = f"{key[0]} block {key[1]}"
    if loads is None:
        return torch.full((num_experts,), 1.0 / num_experts, dtype=torch.float64)
    if key not in loads:
        raise ValueError(f"no expert loads for {where}")
    w = torch.as_tensor(list(loads[key]), dtype=torch.float64)
    if w.shape != (num_experts,) or bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
        raise ValueError(f"{where}: expert loads {w.tolist()} are not {num_experts} non-negative numbers")
    if float(w.sum()) <= 0:
        raise ValueError(f"{where}: every expert load is 0 (no tokens reached the layer?)")
    return w / w.sum()


@torch.no_grad()
def merge_layer(layer: MoEFFN, weights: torch.Tensor, where: str = "layer") -> nn.Module:
    """One dense FFN (a copy of expert 0's module) whose every parameter is sum_e weights[e] * expert_e's."""
    experts = _local_experts(layer, where)
    dense = copy.deepcopy(experts[0])
    params = [dict(e.named_parameters()) for e in experts]
    for name, p in dense.named_parameters():
        acc = torch.zeros(p.shape, dtype=torch.float64, device=p.device)
        for w, ps in zip(weights.tolist(), params):
            acc += w * ps[name].double()
        p.copy_(acc.to(p.dtype))
    return dense


def merge_to_dense(model: nn.Module, loads: Mapping[LayerKey, Sequence[float]] | None = None) -> nn.Module:
    """Replace every MoE FFN by the weighted average of its experts, in place; returns `model`.

    loads: (tower, block) -> per-expert load (any non-negative scale; normalised per layer); None = plain average.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layers: nothing to merge")
    for tower, block, layer in layers:
        w = _weights(loads, (tower, block), layer.num_experts)
        tower_blocks(model, tower)[block].mlp = merge_layer(layer, w, f"{tower} block {block}")
    _install_text_mask_hook(model)  # no text MoE layers left: removes the padding-mask hook
    return model


def kept_experts(loads: Sequence[float], keep: int) -> list[int]:
    """Indices of the `keep` largest loads, in their original order (ties: the lower index stays)."""
    order = sorted(range(len(loads)), key=lambda e: (-float(loads[e]), e))
    return sorted(order[:keep])


@torch.no_grad()
def prune_layer(layer: MoEFFN, keep: Sequence[int], where: str = "layer") -> MoEFFN:
    """A new MoE FFN with experts `keep` (their modules and router rows), top-k = min(top-k, len(keep))."""
    experts = _local_experts(layer, where)
    if not keep or len(set(keep)) != len(keep) or not all(0 <= e < len(experts) for e in keep):
        raise ValueError(f"{where}: cannot keep experts {list(keep)} of {len(experts)}")
    old = layer.router
    router = TopKRouter(old.proj.in_features, len(keep), min(old.top_k, len(keep)), jitter=old.jitter)
    router.to(device=old.proj.weight.device, dtype=old.proj.weight.dtype)
    router.proj.weight.copy_(old.proj.weight[list(keep)])
    router.train(old.training)
    new = MoEFFN([experts[e] for e in keep], router, dispatch=experts.dispatch)
    new.train(layer.training)
    return new


def prune_experts(model: nn.Module, loads: Mapping[LayerKey, Sequence[float]], keep: int) -> dict[LayerKey, list[int]]:
    """Keep the `keep` most-loaded experts of every MoE layer, in place; returns the kept indices per layer."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layers: nothing to prune")
    kept: dict[LayerKey, list[int]] = {}
    for tower, block, layer in layers:
        where = f"{tower} block {block}"
        if not 1 <= keep <= layer.num_experts:
            raise ValueError(f"--keep {keep}: {where} has {layer.num_experts} experts; keep 1..{layer.num_experts}")
        if (tower, block) not in loads:
            raise ValueError(f"no expert loads for {where}")
        if len(loads[(tower, block)]) != layer.num_experts:
            raise ValueError(f"{where}: {len(loads[(tower, block)])} loads for {layer.num_experts} experts")
        kept[(tower, block)] = kept_experts(loads[(tower, block)], keep)
        tower_blocks(model, tower)[block].mlp = prune_layer(layer, kept[(tower, block)], where)
    _install_text_mask_hook(model)  # the hook must point at the new text layers
    return kept
