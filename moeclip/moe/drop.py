"""Drop-Upcycling (Nakamura et al., ICLR 2025): copies of the dense FFN that start partly re-initialised.

Copy-upcycled experts are identical, so their router has nothing to tell apart and training them from the
same point keeps them close (docs/results.md: experts 1-1.5% apart). Re-drawing a random fraction `ratio`
of each expert's hidden units (their `c_fc` rows and bias, their `c_proj` columns) from a normal with the
original matrix's mean and std gives every expert its own part to learn while it keeps (1 - ratio) of what
the dense FFN knew. The paper's best was ratio 0.5.
"""
from __future__ import annotations

import torch
from torch import nn

from .layer import MoEFFN


def _redraw(values: torch.Tensor, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Normal noise of `values`' shape with `like`'s mean and std (fp32 statistics, `values`' dtype)."""
    ref = like.detach().float()
    noise = torch.randn(values.shape, generator=generator, dtype=torch.float32)
    return (noise * ref.std() + ref.mean()).to(device=values.device, dtype=values.dtype)


def drop_reinit(layer: MoEFFN, ratio: float, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Re-initialise `ratio` of every expert's hidden units in place; returns each expert's re-drawn unit ids.

    The statistics are the expert's own weights before the change (each expert starts as the dense FFN);
    each expert draws its own units.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"drop ratio must be in [0, 1], got {ratio}")
    if not isinstance(layer.experts, nn.ModuleList):
        raise ValueError("drop_reinit needs the layer's local experts (apply it before expert-parallel sharding)")
    generator = generator or torch.default_generator
    dropped = []
    with torch.no_grad():
        for expert in layer.experts:
            fc, proj = expert.c_fc, expert.c_proj
            hidden = fc.out_features
            units = torch.randperm(hidden, generator=generator)[:round(ratio * hidden)]
            dropped.append(units)
            if units.numel() == 0:
                continue
            fc.weight[units] = _redraw(fc.weight[units], fc.weight, generator)
            if fc.bias is not None:
                fc.bias[units] = _redraw(fc.bias[units], fc.bias, generator)
            proj.weight[:, units] = _redraw(proj.weight[:, units], proj.weight, generator)
    return dropped
