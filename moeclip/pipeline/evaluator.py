"""Evaluate each named model of a recipe once, on every rank, and keep the metrics on disk.

A recipe evaluates several models (base, stages, baselines, the result) on one validation file with one
tokenizer; a re-run reads the cached metrics instead of evaluating again, unless they were made under
another retrieval protocol (files without one predate protocols: multi_positive).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from torch import nn

from moeclip import io
from moeclip.eval.evaluate import evaluate
from moeclip.eval.retrieval import DEFAULT_PROTOCOL, check_protocol
from moeclip.runtime import Runtime

log = logging.getLogger(__name__)


class Evaluator:
    """Evaluates each named model once, sharded over every rank on its accelerator, and caches the metrics."""

    def __init__(self, root: Path, preprocess: Callable, tokenizer: Callable, val: str, batch_size: int,
                 runtime: Runtime, image_root: str | None = None, protocol: str = DEFAULT_PROTOCOL,
                 on_result: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.root, self.preprocess, self.tokenizer, self.runtime = root, preprocess, tokenizer, runtime
        self.val, self.batch_size, self.image_root = val, batch_size, image_root
        self.protocol = check_protocol(protocol)
        self.on_result = on_result  # rank 0 hands each model's metrics to it (the recipe's trackers)
        self.results: dict[str, Any] = {}

    def __call__(self, name: str, make_model: Callable[[], nn.Module]) -> None:
        path = self.root / f"{name}.json"
        # every rank sees the same: files appear only behind the barrier below
        if not path.exists() or io.read_json(path).get("protocol", "multi_positive") != self.protocol:
            model = make_model()
            metrics = evaluate(model, self.preprocess, self.tokenizer, self.val, batch_size=self.batch_size,
                               progress=False, runtime=self.runtime, image_root=self.image_root,
                               protocol=self.protocol)
            del model
            if self.runtime.is_main:
                io.write_json(path, metrics)
                log.info("%s: mean R@1 %.1f", name, 100 * metrics["mean_R@1"])
        self.runtime.barrier()
        if self.runtime.is_main:
            self.results[name] = io.read_json(path)
            if self.on_result is not None:
                self.on_result(name, self.results[name])
