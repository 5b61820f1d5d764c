"""Fine-tune an existing MoE CLIP on one's own data, behind `accelerate launch recipes/finetune.py`:

base (a moeclip MoE model directory or a CLIP-MoE `.pt` release) -> evaluation on data.val -> the router
fine-tuning step alone (router, router+experts or full) -> model/ -> evaluation again -> report.json /
report.md saying plainly whether the fine-tuned model is better or worse than the one it started from.
Re-running the same command resumes: training from its last checkpoint, finished steps not at all.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from moeclip import io
from moeclip.config import ConfigError, to_dict
from moeclip.loader import CLIP_MOE_SUFFIXES, load, save_model_dir
from moeclip.moe import moe_layers
from moeclip.pipeline.common import DataConfig, ModelConfig, ensure_data, environment, load_base, open_train_data
from moeclip.pipeline.evaluator import Evaluator
from moeclip.train.dist import DistributedConfig, make_runtime
from moeclip.train.moe_finetune import MoEFinetuneConfig, finetune_moe
from moeclip.train.tracking import LoggingConfig, configure, eval_values, open_step

log = logging.getLogger(__name__)

COMPARED = ("image_to_text_R@1", "image_to_text_R@5", "image_to_text_R@10",
            "text_to_image_R@1", "text_to_image_R@5", "text_to_image_R@10", "mean_R@1")
HEADLINE = "mean_R@1"


@dataclass
class FinetuneConfig:
    base: str = "runs/dmu/model"  # a moeclip MoE model directory, or a CLIP-MoE .pt file
    top_k: int | None = None      # experts per token for a .pt file (not stored in it; None = 2)
    output_dir: str = "runs/finetune"
    seed: int = 0
    eval_batch: int = 256
    eval_protocol: Literal["per_caption", "multi_positive"] = "per_caption"  # moeclip.eval.retrieval
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # e.g. model.context_length=248 for long captions
    finetune: MoEFinetuneConfig = field(default_factory=MoEFinetuneConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # docs/distributed.md
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # trackers, OUTPUT_DIR/logs/<step>/


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Returns the report (on rank 0; {} on the others, or when stopped early by finetune.train.stop_at)."""
    runtime = make_runtime(cfg.distributed)
    env = environment(runtime)  # at the start: the code that trains
    out = Path(cfg.output_dir)
    started = time.time()
    configure(runtime.trainer, cfg.logging, out)
    if cfg.top_k is not None and Path(cfg.base).suffix not in CLIP_MOE_SUFFIXES:
        raise ConfigError(f"top_k={cfg.top_k}: applies to a CLIP-MoE .pt base; a moeclip model directory "
                          f"({cfg.base}) keeps its own top-k")
    ensure_data(cfg.data, runtime.is_main)
    runtime.barrier()
    torch.manual_seed(cfg.seed)
    model, preprocess, tokenizer = load_base(cfg.base, cfg.model, cfg.top_k)
    if not moe_layers(model):
        raise ConfigError(f"base={cfg.base}: a dense model; this recipe fine-tunes an MoE CLIP (make one with "
                          "recipes/dmu.py, moeclip.upcycle, or use a CLIP-MoE .pt release)")
    train_ds = open_train_data(cfg.data, preprocess)
    eval_log = open_step(runtime.trainer, "eval")
    evals = Evaluator(out / "evals", preprocess, tokenizer, cfg.data.val, cfg.eval_batch, runtime, cfg.data.image_root,
                      cfg.data.workers, cfg.data.also_val, cfg.eval_protocol,
                      on_result=lambda name, m: eval_log.log(eval_values(name, m), step=0))
    evals("before", lambda: model)

    model_dir = out / "model"
    if (model_dir / "config.json").exists():
        log.info("%s: already fine-tuned", model_dir)
    else:
        result = finetune_moe(model, train_ds, tokenizer, cfg.finetune, out / "train", runtime, cfg.seed,
                              f"fine-tune ({cfg.finetune.mode})")
        if result["steps"] < cfg.finetune.train.steps:  # finetune.train.stop_at: a checkpoint, not a model
            if runtime.is_main:
                print(f"stopped at step {result['steps']} of {cfg.finetune.train.steps} (finetune.train.stop_at); "
                      "re-run without it to continue")
            eval_log.close()
            runtime.barrier()
            return {}
        summary = {k: result[k] for k in ("steps", "samples", "seconds", "skipped")}
        if runtime.is_main:
            save_model_dir(model, model_dir, extra={"pipeline": "finetune", "base": str(cfg.base),
                                                    "config": to_dict(cfg),
                                                    "finetune": {**summary, "mode": cfg.finetune.mode,
                                                                 "history": result["history"]}})
        runtime.barrier()
    del model
    evals("after", lambda: load(model_dir)[0])

    report: dict[str, Any] = {}
    if runtime.is_main:
        report = make_report(evals.results["before"], evals.results["after"], cfg,
                             io.read_json(model_dir / "config.json").get("finetune", {}), time.time() - started)
        report["environment"] = env
        write_report(out, report)
    eval_log.close()
    runtime.barrier()
    return report


def make_report(before: dict, after: dict, cfg: FinetuneConfig, finetune: dict, wall: float) -> dict[str, Any]:
    """Before/after metrics, their differences, and which model is better on mean R@1 (ties say so)."""
    change = {k: round(after[k] - before[k], 6) for k in COMPARED if k in before and k in after}
    delta = change[HEADLINE]
    verdict = "after" if delta > 0 else "before" if delta < 0 else "tie"
    return {"better": verdict, "headline_metric": HEADLINE, "before": before, "after": after, "change": change,
            "base": cfg.base, "data": {"train": cfg.data.train, "val": cfg.data.val},
            "finetune": {k: v for k, v in finetune.items() if k != "history"},
            "history": finetune.get("history", []), "config": to_dict(cfg),
            "this_invocation_wall_s": round(wall, 1)}


def write_report(out: Path, report: dict[str, Any]) -> Path:
    io.write_json(out / "report.json", report)
    before, after, change = report["before"], report["after"], report["change"]
    delta = change[HEADLINE]
    if report["better"] == "after":
        verdict = (f"**Fine-tuning helped**: {HEADLINE} {100 * before[HEADLINE]:.1f} -> {100 * after[HEADLINE]:.1f} "
                   f"(+{100 * delta:.1f} points) on {report['data']['val']}.")
    elif report["better"] == "before":
        verdict = (f"**Fine-tuning made the model WORSE**: {HEADLINE} {100 * before[HEADLINE]:.1f} -> "
                   f"{100 * after[HEADLINE]:.1f} ({100 * delta:.1f} points) on {report['data']['val']}. "
                   f"Keep the base ({report['base']}); the fine-tuned model in model/ is the worse one.")
    else:
        verdict = f"**No change** in {HEADLINE} ({100 * before[HEADLINE]:.1f}) on {report['data']['val']}."
    ft = report["finetune"]
    n = after.get("num_images") or 0
    if n:  # a small validation set moves in coarse steps: say how coarse
        verdict += f" {n} validation images: one image is {100 / n:.1f} points of an image-to-text recall."
    lines = ["# Fine-tuning report", "", verdict, "",
             f"Base `{report['base']}`, trained on `{report['data']['train']}` ({ft.get('mode')}, "
             f"{ft.get('steps')} steps, {ft.get('samples')} samples, {ft.get('seconds')} s). "
             f"Retrieval protocol `{after.get('protocol', 'multi_positive')}` (docs/usage.md).", "",
             "| metric | before | after | change |", "|---|---|---|---|"]
    stretched = report["config"]["model"]["context_length"]
    if stretched:
        lines[-2:-2] = [f"'Before' is the base with its text context stretched to {stretched} positions "
                        "(model.context_length), untrained on them; the base as published was not evaluated.", ""]
    for k in COMPARED:
        if k in change:
            mark = " (better)" if change[k] > 0 else " (worse)" if change[k] < 0 else ""
            lines.append(f"| {k} | {100 * before[k]:.1f} | {100 * after[k]:.1f} | {100 * change[k]:+.1f}{mark} |")
    for name, m in (("before", before), ("after", after)):
        if m.get("skipped"):
            lines.append(f"\nSkipped while evaluating {name}: "
                         + ", ".join(f"{n} {r}" for r, n in m["skipped"].items()))
    if ft.get("skipped"):
        lines.append("\nSkipped in training: " + ", ".join(f"{n} {r}" for r, n in ft["skipped"].items()))
    lines.append("\nThe fine-tuned model is in `model/` (`moeclip eval --model model/`; `moeclip export --format "
                 "clip-moe` writes it in the authors' layout when it is a QuickGELU CLIP with 248 positions).")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"
