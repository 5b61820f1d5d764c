"""Router auxiliary losses, over real tokens only.

Padding tokens are routed too (dropless), but counting them would reward sending text padding
evenly, which says nothing about how real tokens use the experts. Nothing here is divided by the
world size: each rank's loss is already a mean, and DDP averages the gradients.
"""
from __future__ import annotations

import torch
from torch import nn

from .layer import MoEFFN
from .router import Routing


def _real(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return t if mask is None else t[mask.reshape(-1)]


def load_balancing_loss(routing: Routing, mask: torch.Tensor | None, num_experts: int) -> torch.Tensor:
    """Switch/Mixtral form E * sum_i f_i * P_i; 1.0 for perfectly uniform routing, E when all on one expert.

    f_i = share of routed (token, slot) pairs on expert i (no gradient), P_i = mean router prob of expert i.
    """
    probs = _real(routing.probs, mask)
    experts = _real(routing.experts, mask)
    if probs.shape[0] == 0:
        return routing.probs.sum() * 0.0  # keeps the graph connected on an all-padding batch
    counts = torch.bincount(experts.reshape(-1), minlength=num_experts).to(probs.dtype)
    fraction = counts / counts.sum()
    mean_prob = probs.mean(dim=0)
    return num_experts * (fraction * mean_prob).sum()


def router_z_loss(routing: Routing, mask: torch.Tensor | None) -> torch.Tensor:
    """ST-MoE z-loss, mean logsumexp(logits)^2: large logits saturate the softmax and make routing brittle."""
    logits = _real(routing.logits, mask)
    if logits.shape[0] == 0:
        return routing.logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def module_tower(name: str) -> str:
    """'visual' for modules under the image tower (also behind wrappers' 'module.' prefix), else 'text'."""
    return "visual" if "visual" in name.split(".") else "text"


def aux_losses(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """{tower: {"lb": ..., "z": ...}}, each the mean over that tower's MoE layers of their last forward.

    Call it after a forward that ran every tower you report: a layer whose tower did not run keeps
    the routing of an older forward.
    """
    per_tower: dict[str, dict[str, list[torch.Tensor]]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, MoEFFN) or module.last_routing is None:
            continue
        losses = per_tower.setdefault(module_tower(name), {"lb": [], "z": []})
        losses["lb"].append(load_balancing_loss(module.last_routing, module.last_mask, module.num_experts))
        losses["z"].append(router_z_loss(module.last_routing, module.last_mask))
    return {tower: {key: torch.stack(values).mean() for key, values in losses.items()}
            for tower, losses in per_tower.items()}
