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
    """Evaluates each named model once, sharded over every rank on its accelerator, and caches the metrics.

    `also`: more validation files (name -> path) every model is evaluated on too, e.g. the old domain after
    adapting a model to a new one (retention); their metrics land in `also_results[name]`.
    """

    def __init__(self, root: Path, preprocess: Callable, tokenizer: Callable, val: str, batch_size: int,
                 runtime: Runtime, image_root: str | None = None, num_workers: int = 0,
                 also: dict[str, str] | None = None) -> None:
        self.root, self.preprocess, self.tokenizer, self.runtime = root, preprocess, tokenizer, runtime
        self.val, self.batch_size, self.image_root, self.num_workers = val, batch_size, image_root, num_workers
        self.sets = {"": val, **(also or {})}  # "" = the main validation set, cached at root/NAME.json
        self.results: dict[str, Any] = {}
        self.also_results: dict[str, dict[str, Any]] = {k: {} for k in also or {}}

    def _path(self, vset: str, name: str) -> Path:
        return (self.root / vset if vset else self.root) / f"{name}.json"

    def __call__(self, name: str, make_model: Callable[[], nn.Module]) -> None:
        todo = [v for v in self.sets if not self._path(v, name).exists()]  # every rank sees the same (barrier)
        if todo:
            model = make_model()
            for vset in todo:
                metrics = evaluate(model, self.preprocess, self.tokenizer, self.sets[vset], batch_size=self.batch_size,
                                   progress=False, runtime=self.runtime, image_root=self.image_root,
                                   num_workers=self.num_workers)
                if self.runtime.is_main:
                    io.write_json(self._path(vset, name), metrics)
                    log.info("%s%s: mean R@1 %.1f", name, f" on {vset}" if vset else "", 100 * metrics["mean_R@1"])
            del model
        self.runtime.barrier()
        if self.runtime.is_main:
            self.results[name] = io.read_json(self._path("", name))
            for vset in self.also_results:
                self.also_results[vset][name] = io.read_json(self._path(vset, name))
