"""FLOPs a model spends, counted by running it under torch's FlopCounterMode rather than by formula.

Counting the real forward keeps MoE costs honest without a model-specific formula: a top-2 layer runs two
experts per token, a shared expert a third, the router its own matmul, and the text tower every position of
its context (padding included, as it does at inference). Only matrix products, convolutions and attention
are counted (FlopCounterMode's set); element-wise work is left out, for dense and MoE alike.
Training cost per sample is one forward and its backward with the step's trainable parameters: frozen
weights need no weight gradients, so router-only training costs less than training the experts.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def _image(model: nn.Module, device: torch.device) -> torch.Tensor:
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    return torch.zeros(1, 3, *size, device=device)


def _text(model: nn.Module, device: torch.device) -> torch.Tensor:
    return torch.zeros(1, model.context_length, dtype=torch.long, device=device)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class _Counting:
    """Train mode while counting: in eval mode under no_grad nn.MultiheadAttention takes a fused fast path
    whose FLOPs FlopCounterMode does not see (CLIP has no dropout, so nothing else changes)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> FlopCounterMode:
        self.model.train()
        self.counter = FlopCounterMode(display=False)
        return self.counter.__enter__()

    def __exit__(self, *exc) -> None:
        self.counter.__exit__(*exc)
        self.model.train(self.was_training)


@torch.no_grad()
def inference_flops(model: nn.Module) -> dict[str, int]:
    """Forward FLOPs to embed one image and one caption."""
    device = _device(model)
    out = {}
    for name, run in (("image", lambda: model.encode_image(_image(model, device))),
                      ("caption", lambda: model.encode_text(_text(model, device)))):
        with _Counting(model) as counter:
            run()
        out[name] = int(counter.get_total_flops())
    return out


def train_flops_per_pair(model: nn.Module, trainable: Sequence[str]) -> int:
    """Forward + backward FLOPs of one (image, caption) pair when only `trainable` parameters learn."""
    device = _device(model)
    wanted = set(trainable)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in wanted)
        with _Counting(model) as counter:
            image = model.encode_image(_image(model, device))
            text = model.encode_text(_text(model, device))
            loss = (image * text).sum()
            if loss.requires_grad:
                loss.backward()
        model.zero_grad(set_to_none=True)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(before[n])
    return int(counter.get_total_flops())
