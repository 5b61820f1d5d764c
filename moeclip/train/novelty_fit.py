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
from moeclip.moe.novelty import DEFAULT_QUANTILE, input_hook, novelty_gates
from moeclip.runtime import Runtime

log = logging.getLogger(__name__)


class _Enough(Exception):
    """Raised by the capture hook: the tokens are taken, the rest of the tower need not run."""


@torch.no_grad()
def gate_inputs(model: nn.Module, dataset: CaptionDataset, tokenizer: Callable, runtime: Runtime, rows: np.ndarray,
                on_batch: Callable[[str, torch.Tensor], None], batch_size: int = 256) -> None:
    """Run `rows` of `dataset` through each tower up to its first FFN and call on_batch(gate name, tokens
    [B, L, d], batch-first, on the CPU) for every gate of `model`; the rest of the tower is skipped."""
    gates = novelty_gates(model)
    if not gates:
        raise ValueError("the model has no novelty gate (upcycle with shared_expert=True, shared_gate='novelty')")
    collate = Collate(tokenizer)
    model.to(runtime.device).eval()
    hooks = []
    for name, gate in gates.items():
        norm, gate_hook = input_hook(model, gate)

        def grab(module, args, output, name=name, gate_hook=gate_hook):
            on_batch(name, gate_hook.tokens(output).float().cpu())
            raise _Enough
        hooks.append(norm.register_forward_hook(grab))
    try:
        for start in range(0, len(rows), batch_size):
            batch = collate([dataset[int(r)] for r in rows[start:start + batch_size]])
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


def fit_novelty_gates(model: nn.Module, dataset: CaptionDataset, tokenizer: Callable, runtime: Runtime, seed: int = 0,
                      rows: int = 2048, quantile: float = DEFAULT_QUANTILE) -> dict[str, dict[str, float]]:
    """Fit every novelty gate of `model` on `rows` sampled training rows; returns {gate: fitted values}."""
    captured: dict[str, list[torch.Tensor]] = {}
    pick = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:rows])
    gate_inputs(model, dataset, tokenizer, runtime, pick, lambda name, t: captured.setdefault(name, []).append(t))
    fitted = {}
    for name, gate in novelty_gates(model).items():
        if not captured.get(name):
            raise ValueError(f"{name}: no training sample could be read to fit the novelty gate")
        fitted[name] = gate.fit(torch.cat(captured[name]), seed=seed, quantile=quantile)
        log.info("novelty gate %s: %s", name, fitted[name])
    return fitted


def gate_shares(model: nn.Module, dataset: CaptionDataset, tokenizer: Callable, runtime: Runtime,
                rows: int = 2000) -> dict[str, dict[str, float]]:
    """Where each gate sends (the first `rows` of) a dataset: {gate: {"to_base": share of samples with gate >= 0.5,
    "mean_gate": mean gate}} (images for the visual gate, captions for the text gate)."""
    gates = novelty_gates(model)
    values: dict[str, list[torch.Tensor]] = {}

    def keep(name: str, tokens: torch.Tensor) -> None:
        values.setdefault(name, []).append(gates[name](tokens.to(gates[name].centroids.device)).cpu())
    gate_inputs(model, dataset, tokenizer, runtime, np.arange(min(rows, len(dataset))), keep)
    out = {}
    for name, v in values.items():
        g = torch.cat(v)
        out[name] = {"to_base": round(float((g >= 0.5).float().mean()), 4), "mean_gate": round(float(g.mean()), 4),
                     "samples": int(g.numel())}
    return out

