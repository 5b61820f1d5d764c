"""Per-factor probe: can the model tell the value of one factor when everything else is right?

For each image and factor, the candidates are its true caption with only that factor swapped
through every value; accuracy = share of images whose true caption scores highest. Chance is
1 / (number of values). A suppressed factor shows up here long before it moves retrieval.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from moeclip.model.encode import encode_texts
from moeclip.runtime import Runtime


def factor_probe(model: nn.Module, tokenizer: Callable, image_features: torch.Tensor, rows: list[dict[str, str]],
                 factors: dict[str, list[str]], template: str, runtime: Runtime | None = None,
                 batch_size: int = 512) -> dict[str, dict[str, float]]:
    """`rows[i]` holds the factor values of image i; returns {factor: {accuracy, chance}}."""
    texts: dict[str, int] = {}
    cand: dict[str, np.ndarray] = {}
    for name, values in factors.items():
        ids = np.empty((len(rows), len(values)), dtype=np.int64)
        for i, row in enumerate(rows):
            for j, v in enumerate(values):
                ids[i, j] = texts.setdefault(template.format(**{**row, name: v}), len(texts))
        cand[name] = ids
    feats = encode_texts(model, tokenizer, list(texts), batch_size, runtime)
    out = {}
    for name, values in factors.items():
        truth = np.array([values.index(row[name]) for row in rows])
        ids = torch.as_tensor(cand[name])
        scores = torch.einsum("nd,nvd->nv", image_features, feats[ids])
        acc = float((scores.argmax(dim=1).numpy() == truth).mean())
        out[name] = {"accuracy": acc, "chance": 1.0 / len(values)}
    return out
