"""Top-k token router of an MoE layer.

The router is tiny (d x E) but decides everything, so it runs in fp32 even under autocast or in a
bf16 model: low-precision logits make near-ties flip experts from step to step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """One forward's routing decision for T tokens; kept on the layer for losses and analysis."""

    logits: torch.Tensor  # fp32 [T, E]
    probs: torch.Tensor  # fp32 [T, E], softmax over all experts (the load-balancing loss needs them)
    weights: torch.Tensor  # [T, k] in the input's dtype, renormalised to sum to 1 over the chosen k
    experts: torch.Tensor  # long [T, k], chosen expert ids, highest probability first

    @property
    def num_tokens(self) -> int:
        return self.logits.shape[0]

    @property
    def num_experts(self) -> int:
        return self.logits.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[1]


# A zero gate gives every logit 0: top-k tie-breaking then sends every token to the same k experts, and with
# renormalised top-k weights the task loss never raises the logit of an expert it did not choose (only the
# load-balancing loss can). A small random gate breaks the tie from the first step, as the authors' nn.Linear
# init did; 0.0 stays available for studies of the zero start.
DEFAULT_ROUTER_INIT_STD = 0.02


class TopKRouter(nn.Module):
    """Linear gate + fp32 softmax + top-k; no capacity limit, so no token is ever dropped."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, jitter: float = 0.0,
                 init_std: float = DEFAULT_ROUTER_INIT_STD) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.proj = nn.Linear(d_model, num_experts, bias=False)
        self.top_k = top_k
        self.jitter = jitter
        self.reset_parameters(init_std)

    @property
    def num_experts(self) -> int:
        return self.proj.out_features

    def reset_parameters(self, init_std: float = DEFAULT_ROUTER_INIT_STD) -> None:
        """Gate weights ~ N(0, init_std); std 0 = all-zero gate (uniform probabilities, tied top-k)."""
        with torch.no_grad():
            if init_std > 0:
                self.proj.weight.normal_(0.0, init_std)
            else:
                self.proj.weight.zero_()

    def forward(self, x: torch.Tensor) -> Routing:
        """x: [T, d] -> Routing. The gate matmul runs exactly once."""
        router_in = x.float()
        if self.training and self.jitter > 0:
            # Switch Transformer's multiplicative noise: explores routings without moving the expert inputs.
            noise = torch.empty_like(router_in).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            router_in = router_in * noise
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(router_in, self.proj.weight.float())
        probs = logits.softmax(dim=-1)
        top_probs, experts = probs.topk(self.top_k, dim=-1)
        if self.top_k == 1:
            # the renormalised top-1 weight is always 1 and carries no gradient; this straight-through
            # form keeps the value 1 (so upcycling stays exact) while the task loss still reaches the router
            weights = top_probs / top_probs.detach()
        else:
            weights = top_probs / top_probs.sum(dim=-1, keepdim=True)
        return Routing(logits=logits, probs=probs, weights=weights.to(x.dtype), experts=experts)

    def extra_repr(self) -> str:
        return (f"d_model={self.proj.in_features}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, jitter={self.jitter}")
