"""`sorted_dispatch` as it was before the bf16-autocast change (commit 11fd77a), kept so the suite can
time before against after in the same run. Not used by moeclip itself."""
from __future__ import annotations

import torch

from moeclip.moe.dispatch import ExpertFn
from moeclip.moe.router import Routing


def sorted_dispatch_v0(x: torch.Tensor, routing: Routing, expert_fn: ExpertFn, num_experts: int) -> torch.Tensor:
    num_tokens, top_k = routing.experts.shape
    if num_tokens == 0:
        return torch.zeros_like(x)
    flat_experts = routing.experts.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)
    counts = torch.bincount(flat_experts, minlength=num_experts).tolist()
    x_sorted = x.index_select(0, order // top_k)
    outputs = [expert_fn(e, chunk) for e, chunk in enumerate(x_sorted.split(counts)) if counts[e] > 0]
    y_sorted = torch.cat(outputs).to(x.dtype)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    y = y_sorted.index_select(0, inverse).view(num_tokens, top_k, -1)
    return torch.einsum("tk,tkd->td", routing.weights.to(x.dtype), y)


def register() -> str:
    from moeclip.moe import DISPATCHERS

    DISPATCHERS["sorted_v0"] = sorted_dispatch_v0
    return "sorted_v0"
