"""Evaluate each named model of a recipe once, on every rank, and keep the metrics on disk.

A recipe evaluates several models (base, stages, baselines, the result) on one validation file with one
tokenizer; a re-run reads the cached metrics instead of evaluating again.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from torch import nn

from moeclip import io
from moeclip.eval.evaluate import evaluate
from moeclip.runtime import Runtime

log = logging.getLogger(__name__)


class Evaluator:
    """Evaluates each named model once, sharded over every rank on its accelerator, and caches the metrics."""

    def __init__(self, root: Path, preprocess: Callable, tokenizer: Callable, val: str, batch_size: int,
                 runtime: Runtime, image_root: str | None = None, num_workers: int = 0) -> None:
        self.root, self.preprocess, self.tokenizer, self.runtime = root, preprocess, tokenizer, runtime
        self.val, self.batch_size, self.image_root, self.num_workers = val, batch_size, image_root, num_workers
        self.results: dict[str, Any] = {}

    def __call__(self, name: str, make_model: Callable[[], nn.Module]) -> None:
        path = self.root / f"{name}.json"
        if not path.exists():  # every rank sees the same: files appear only behind the barrier below
            model = make_model()
            metrics = evaluate(model, self.preprocess, self.tokenizer, self.val, batch_size=self.batch_size,
                               progress=False, runtime=self.runtime, image_root=self.image_root,
                               num_workers=self.num_workers)
            del model
            if self.runtime.is_main:
                io.write_json(path, metrics)
                log.info("%s: mean R@1 %.1f", name, 100 * metrics["mean_R@1"])
        self.runtime.barrier()
        if self.runtime.is_main:
            self.results[name] = io.read_json(path)
