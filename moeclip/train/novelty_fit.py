"""Fitting the novelty gates of an MoE CLIP (`moeclip.moe.novelty`) on the data it is about to be trained on.

The gate has to know the training data before training starts: the routed experts then learn with the gate
as it will be at test time (open for the training data, closed for what is unlike it). Every rank reads the
same seeded sample of rows and fits the same gate, so no collective is needed.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
from torch import nn

from moeclip.data.dataset import CaptionDataset, Collate
from moeclip.moe.novelty import DEFAULT_QUANTILE, NoveltyHook, novelty_gates
from moeclip.runtime import Runtime

log = logging.getLogger(__name__)


class _Enough(Exception):
    """Raised by the capture hook: the tokens are taken, the rest of the tower need not run."""


@torch.no_grad()
def fit_novelty_gates(model: nn.Module, dataset: CaptionDataset, tokenizer: Callable, runtime: Runtime,
                      seed: int = 0, rows: int = 2048, quantile: float = DEFAULT_QUANTILE,
                      batch_size: int = 256) -> dict[str, dict[str, float]]:
    """Fit every novelty gate of `model` on `rows` sampled training rows; returns {gate: fitted values}."""
    gates = novelty_gates(model)
    if not gates:
        raise ValueError("the model has no novelty gate (upcycle with shared_expert=True, shared_gate='novelty')")
    pick = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:rows])
    collate = Collate(tokenizer)
    model.to(runtime.device).eval()
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in gates}
    hooks = []
    for name, gate in gates.items():
        norm = _hooked_norm(model, gate)
        batch_first = next(h for h in norm._forward_hooks.values() if isinstance(h, NoveltyHook)).batch_first

        def grab(module, args, output, name=name, batch_first=batch_first):
            captured[name].append((output if batch_first else output.transpose(0, 1)).float().cpu())
            raise _Enough
        hooks.append(norm.register_forward_hook(grab))
    try:
        for start in range(0, len(pick), batch_size):
            batch = collate([dataset[int(r)] for r in pick[start:start + batch_size]])
            with runtime.autocast():
                for encode, key in ((model.encode_image, "image"), (model.encode_text, "text")):
                    if key in batch:
                        try:
                            encode(batch[key].to(runtime.device))
                        except _Enough:
                            pass
    finally:
        for h in hooks:
            h.remove()
    fitted = {}
    for name, gate in gates.items():
        if not captured[name]:
            raise ValueError(f"{name}: no training sample could be read to fit the novelty gate")
        fitted[name] = gate.fit(torch.cat(captured[name]), seed=seed, quantile=quantile)
        log.info("novelty gate %s: %s", name, fitted[name])
    return fitted


def _hooked_norm(model: nn.Module, gate: nn.Module) -> nn.Module:
    """The module whose NoveltyHook feeds `gate` (block 0's ln_2 of its tower)."""
    for module in model.modules():
        for hook in module._forward_hooks.values():
            if isinstance(hook, NoveltyHook) and hook.gate is gate:
                return module
    raise ValueError("novelty gate without its input hook; rebuild the model with moeclip.moe.upcycle")
