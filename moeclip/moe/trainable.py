"""Which parameters of an MoE CLIP train, by the named regimes of the method and its baselines."""
from __future__ import annotations

from torch import nn

from .layer import MoEFFN

TRAINABLE_MODES = ("router", "router+experts", "full")


def set_trainable(model: nn.Module, mode: str, freeze_shared: bool = False) -> list[str]:
    """Freeze everything outside `mode`; returns the trainable parameter names (state-dict order).

    "router": DMU's router fine-tuning (experts frozen; a shared expert's fusion gate trains with the router);
    "router+experts": the sparse-upcycling baseline, whose identical experts only diverge if they train (the
    shared expert trains too, unless `freeze_shared`: it then keeps the base's weights, what the base knew,
    while the routed experts and the gate learn the new data); "full": everything.
    """
    if mode not in TRAINABLE_MODES:
        raise ValueError(f"unknown trainable mode {mode!r}; expected one of {TRAINABLE_MODES}")
    layer_names = [name for name, module in model.named_modules() if isinstance(module, MoEFFN)]
    if mode != "full" and not layer_names:
        raise ValueError(f"mode {mode!r} needs MoE layers; call upcycle() first")
    parts = ("router", "fusion") if mode == "router" else ("router", "fusion", "experts", "shared")
    if freeze_shared:
        if mode == "full":
            raise ValueError("freeze_shared with mode 'full' (every parameter trains): use router+experts")
        parts = tuple(p for p in parts if p != "shared")
    prefixes = tuple(f"{layer}.{part}." for layer in layer_names for part in parts)

    trainable = []
    for name, param in model.named_parameters():
        train = mode == "full" or name.startswith(prefixes)
        param.requires_grad_(train)
        if train:
            trainable.append(name)
    return trainable
