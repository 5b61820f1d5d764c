"""Moving routed tokens to their experts and back (dropless, one device).

Two implementations with one signature, so a test can hold one against the other:
`sorted_dispatch` (sort (token, slot) pairs by expert, one contiguous slice per expert: the
torchtune / MegaBlocks layout) and `loop_dispatch` (per-expert gather + `index_add_`, as in
Mixtral's eager code and the CLIP-MoE reference). Neither drops a token; both cost one expert
call per non-empty expert, never a Python loop over tokens.
"""
from __future__ import annotations

from typing import Callable

import torch

from .router import Routing

ExpertFn = Callable[[int, torch.Tensor], torch.Tensor]  # (expert id, tokens [n, d]) -> [n, d]


def sorted_dispatch(x: torch.Tensor, routing: Routing, expert_fn: ExpertFn, num_experts: int) -> torch.Tensor:
    """x [T, d] -> sum_j weights[t, j] * expert_{experts[t, j]}(x[t]), as [T, d] in x's dtype."""
    num_tokens, top_k = routing.experts.shape
    if num_tokens == 0:
        return torch.zeros_like(x)
    flat_experts = routing.experts.reshape(-1)  # slot s belongs to token s // top_k
    order = torch.argsort(flat_experts, stable=True)
    counts = torch.bincount(flat_experts, minlength=num_experts).tolist()  # one host sync, needed to split
    x_sorted = x.index_select(0, order // top_k)  # the only gather of the activations

    outputs = [expert_fn(e, chunk) for e, chunk in enumerate(x_sorted.split(counts)) if counts[e] > 0]
    y_sorted = torch.cat(outputs).to(x.dtype)

    # Inverse permutation back to (token, slot) order, then a k-term weighted sum: deterministic, no atomics.
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    y = y_sorted.index_select(0, inverse).view(num_tokens, top_k, -1)
    return torch.einsum("tk,tkd->td", routing.weights.to(x.dtype), y)


def loop_dispatch(x: torch.Tensor, routing: Routing, expert_fn: ExpertFn, num_experts: int) -> torch.Tensor:
    """Reference implementation (Mixtral eager style); same contract as `sorted_dispatch`."""
    out = torch.zeros_like(x)
    for e in range(num_experts):
        token_idx, slot_idx = torch.where(routing.experts == e)
        if token_idx.numel() == 0:
            continue
        y = expert_fn(e, x[token_idx]).to(x.dtype)
        out.index_add_(0, token_idx, y * routing.weights[token_idx, slot_idx].to(x.dtype).unsqueeze(-1))
    return out


DISPATCHERS: dict[str, Callable[[torch.Tensor, Routing, ExpertFn, int], torch.Tensor]] = {
    "sorted": sorted_dispatch,
    "loop": loop_dispatch,
}
