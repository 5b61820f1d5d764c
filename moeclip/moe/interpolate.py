"""Weight-space interpolation of a fine-tuned CLIP with the base it came from (WiSE-FT, Wortsman et al. 2022).

The standard way to keep what a base knew after fine-tuning on a new domain, with no training and no old data:
theta = (1 - alpha) * theta_base + alpha * theta_finetuned. It needs a base counterpart for every weight. An
upcycled MoE has one: every expert (and a shared expert) started as a copy of its block's dense FFN, so each is
pulled towards that FFN. The router and the fusion gate are new weights with no base value and stay as trained.
At alpha = 0 the MoE computes exactly what the base does (top-k weights sum to 1 over identical experts, and the
fusion gate mixes two identical FFNs); at alpha = 1 it is the fine-tuned model.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from .layer import LocalExperts
from .upcycle import moe_layers

# `...mlp.experts.3.c_fc.weight` and `...mlp.shared.c_fc.weight` started as `...mlp.c_fc.weight`
_EXPERT_PART = re.compile(r"\.mlp\.(?:experts\.\d+|shared)\.")


def base_name(name: str) -> str:
    """The base model's name for a (possibly MoE) model's weight."""
    return _EXPERT_PART.sub(".mlp.", name)


@torch.no_grad()
def interpolate_with_base(model: nn.Module, base: nn.Module, alpha: float) -> nn.Module:
    """Moves `model`'s weights (in place) to (1 - alpha) * base + alpha * model; returns `model`.

    `base` is the dense CLIP `model` was fine-tuned (or upcycled and fine-tuned) from. Weights without a base
    counterpart (router, fusion gate, a novelty gate's fitted statistics) and non-float buffers keep their values.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}: expected a value in [0, 1] (0 = the base, 1 = the fine-tuned model)")
    for tower, block, layer in moe_layers(model):
        if not isinstance(layer.experts, LocalExperts):
            raise ValueError(f"{tower} block {block}: experts are sharded over ranks; consolidate the checkpoint "
                             "first (`moeclip consolidate`), then interpolate")
    base_state = base.state_dict()
    used: set[str] = set()
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        source = base_name(name)
        if source not in base_state:
            if ".mlp.router." in name or ".mlp.fusion." in name or ".novelty_gate." in name:
                continue  # new in the MoE: nothing to pull it towards
            raise ValueError(f"weight {name!r} has no counterpart {source!r} in the base model: interpolate a model "
                             "with the base it was fine-tuned from")
        start = base_state[source]
        if start.shape != tensor.shape:
            raise ValueError(f"weight {name!r} is {tuple(tensor.shape)} but the base's {source!r} is "
                             f"{tuple(start.shape)}: not the base this model came from")
        tensor.lerp_(start.to(device=tensor.device, dtype=tensor.dtype), 1.0 - alpha)
        used.add(source)
    missing = [k for k, v in base_state.items() if v.is_floating_point() and k not in used]
    if missing:
        raise ValueError(f"the base has {len(missing)} weight(s) the model lacks (first: {missing[0]!r}): "
                         "not the architecture this model came from")
    return model
