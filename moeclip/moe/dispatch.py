"""Moving routed tokens to their experts and back (dropless, one device).

Two implementations with one signature, so a test can hold one against the other:
`sorted_dispatch` (sort (token, slot) pairs by expert, one contiguous slice per expert: the
torchtune / MegaBlocks layout) and `loop_dispatch` (per-expert gather + `index_add_`, as in
Mixtral's eager code and the CLIP-MoE reference). Neither drops a token; both cost one expert
call per non-empty expert, never a Python loop over tokens.

Both return the experts' compute dtype, like a dense FFN: x's dtype, or the autocast dtype under
autocast (on any device). Under autocast the T token rows are cast once before the gather makes
their T*k copies, and the expert outputs are never round-tripped through x's dtype
(docs/benchmarks.md has the measurements).
"""
from __future__ import annotations

from typing import Callable

import torch

from .router import Routing

ExpertFn = Callable[[int, torch.Tensor], torch.Tensor]  # (expert id, tokens [n, d]) -> [n, d]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts' matmuls run in: the autocast dtype when autocast is on for x's device."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def sorted_dispatch(x: torch.Tensor, routing: Routing, expert_fn: ExpertFn, num_experts: int) -> torch.Tensor:
    """x [T, d] -> sum_j weights[t, j] * expert_{experts[t, j]}(x[t]), as [T, d] in the compute dtype."""
    num_tokens, top_k = routing.experts.shape
    dtype = compute_dtype(x)
    if num_tokens == 0:
        return x.new_zeros(x.shape, dtype=dtype)
    flat_experts = routing.experts.reshape(-1)  # slot s belongs to token s // top_k
    order = torch.argsort(flat_experts, stable=True)
    counts = torch.bincount(flat_experts, minlength=num_experts).tolist()  # one host sync, needed to split
    # the only gather of the activations (cast first: autocast would cast each of the k copies)
    x_sorted = x.to(dtype).index_select(0, order // top_k if top_k > 1 else order)

    outputs = [expert_fn(e, chunk) for e, chunk in enumerate(x_sorted.split(counts)) if counts[e] > 0]
    y_sorted = torch.cat(outputs)

    # Inverse permutation back to (token, slot) order, then a k-term weighted sum: deterministic, no atomics.
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    y = y_sorted.index_select(0, inverse)
    weights = routing.weights.to(y.dtype)
    if top_k == 1:
        return y * weights
    # a batched [1, k] x [k, d] product: accumulates in fp32 even for bf16/fp16 outputs
    return torch.einsum("tk,tkd->td", weights, y.view(num_tokens, top_k, -1))


def loop_dispatch(x: torch.Tensor, routing: Routing, expert_fn: ExpertFn, num_experts: int) -> torch.Tensor:
    """Reference implementation (Mixtral eager style); same contract as `sorted_dispatch`."""
    dtype = compute_dtype(x)
    out = x.new_zeros(x.shape, dtype=dtype)
    for e in range(num_experts):
        token_idx, slot_idx = torch.where(routing.experts == e)
        if token_idx.numel() == 0:
            continue
        y = expert_fn(e, x[token_idx]).to(dtype)
        out.index_add_(0, token_idx, y * routing.weights[token_idx, slot_idx].to(dtype).unsqueeze(-1))
    return out


DISPATCHERS: dict[str, Callable[[torch.Tensor, Routing, ExpertFn, int], torch.Tensor]] = {
    "sorted": sorted_dispatch,
    "loop": loop_dispatch,
}
