"""The whole DMU pipeline behind `accelerate launch recipes/dmu.py`:

base -> MCL stages (experts) -> upcycle -> router fine-tuning -> evaluation of the base, every
stage model, the copy-upcycling baseline and the DMU model -> report.json / report.md / model/.
Every step leaves files that mark it done, so re-running the same command resumes.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn

from moeclip import io
from moeclip.config import to_dict
from moeclip.data.dataset import CaptionDataset, read_table
from moeclip.eval.evaluate import evaluate, find_factors
from moeclip.loader import load, save_model_dir
from moeclip.mcl.stages import MCLConfig, run_mcl
from moeclip.model.ffn import ffn_distance, ffn_param_names, load_ffn_state_dict
from moeclip.moe import upcycle
from moeclip.pipeline.common import DataConfig, ensure_data
from moeclip.pipeline.report import expert_usage, write_report
from moeclip.train.dist import make_accelerator
from moeclip.train.loop import train
from moeclip.train.moe_finetune import MoEFinetuneConfig, finetune_moe

log = logging.getLogger(__name__)


@dataclass
class UpcycleConfig:
    top_k: int = 2
    layers: list[int] | None = None    # blocks that become MoE (None = all)
    jitter: float = 0.0
    router_init_std: float = 0.0


def _baseline_default() -> MoEFinetuneConfig:
    return MoEFinetuneConfig(mode="router+experts")


@dataclass
class BaselinesConfig:
    upcycle: bool = True               # copy-upcycling: every expert a copy of the dense FFN
    upcycle_finetune: MoEFinetuneConfig = field(default_factory=_baseline_default)
    dense_ft: bool = True              # continued fine-tuning of all FFNs, plain batches (MCL's hyper-parameters)
    # "total": each baseline trains on as many samples as DMU used in all (MCL stages + router FT);
    # "router_ft": only as many as DMU's router fine-tuning
    budget: Literal["total", "router_ft"] = "total"
    dmu_router_experts: bool = True    # also report DMU with routers + experts trained (an ablation)


@dataclass
class DMUConfig:
    base: str = "checkpoints/base-tiny"
    output_dir: str = "runs/dmu"
    seed: int = 0
    eval_batch: int = 256
    data: DataConfig = field(default_factory=DataConfig)
    mcl: MCLConfig = field(default_factory=MCLConfig)
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)
    router_ft: MoEFinetuneConfig = field(default_factory=MoEFinetuneConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)


def run_dmu(cfg: DMUConfig) -> dict[str, Any]:
    accelerator = make_accelerator()
    main = accelerator.is_main_process
    out = Path(cfg.output_dir)
    timings: dict[str, float] = {}
    ensure_data(cfg.data, main)
    accelerator.wait_for_everyone()
    torch.manual_seed(cfg.seed)
    base, preprocess, tokenizer = load(cfg.base)
    train_ds = CaptionDataset(cfg.data.train, preprocess)
    factors = find_factors(cfg.data.train)
    factor_columns = ({f: train_ds.column(f) for f in factors["factors"]} if factors else None)
    evals = _Evaluator(out / "evals", preprocess, tokenizer, cfg, main)

    t = time.time()
    experts = run_mcl(base, train_ds, tokenizer, cfg.mcl, out / "mcl", accelerator, cfg.seed, factor_columns)
    timings["mcl"] = time.time() - t

    t = time.time()
    evals("base", lambda: base)
    for s in range(1, len(experts)):
        evals(f"mcl_stage_{s}", lambda s=s: _stage_model(base, experts[s]))
    timings["eval_base_and_stages"] = time.time() - t

    ucfg = cfg.upcycle
    t = time.time()
    dmu = upcycle(copy.deepcopy(base), experts, top_k=ucfg.top_k, layers=ucfg.layers, towers=cfg.mcl.towers,
                  jitter=ucfg.jitter, router_init_std=ucfg.router_init_std)
    model_dir = out / "model"
    ft = _finetune_once(dmu, train_ds, tokenizer, cfg.router_ft, out / "router_ft", model_dir, accelerator,
                        cfg.seed, "DMU router FT", {"pipeline": "dmu", "config": to_dict(cfg)})
    timings["router_ft"] = time.time() - t
    evals("dmu", lambda: load(model_dir)[0])

    bl = cfg.baselines
    budget = ft["samples"] + (len(experts) - 1) * cfg.mcl.train.steps * cfg.mcl.train.global_batch
    if bl.budget == "router_ft":
        budget = ft["samples"]
    baseline_info = {}
    if bl.dmu_router_experts:
        t = time.time()
        dx = upcycle(copy.deepcopy(base), experts, top_k=ucfg.top_k, layers=ucfg.layers, towers=cfg.mcl.towers,
                     jitter=ucfg.jitter, router_init_std=ucfg.router_init_std)
        xcfg = copy.deepcopy(cfg.router_ft)
        xcfg.mode = "router+experts"
        xcfg.train.lr = bl.upcycle_finetune.train.lr
        _finetune_once(dx, train_ds, tokenizer, xcfg, out / "ablations" / "dmu_router_experts" / "train",
                       out / "ablations" / "dmu_router_experts" / "model", accelerator, cfg.seed,
                       "DMU router+experts", {"pipeline": "dmu-router+experts"})
        timings["dmu_router_experts"] = time.time() - t
        evals("dmu_router_experts", lambda: load(out / "ablations" / "dmu_router_experts" / "model")[0])
    if bl.upcycle:
        t = time.time()
        up = upcycle(copy.deepcopy(base), None, num_experts=len(experts), top_k=ucfg.top_k, layers=ucfg.layers,
                     towers=cfg.mcl.towers, jitter=ucfg.jitter, router_init_std=ucfg.router_init_std)
        bcfg = copy.deepcopy(bl.upcycle_finetune)
        bcfg.train.steps = max(1, budget // bcfg.train.global_batch)
        baseline_info["upcycle"] = _finetune_once(up, train_ds, tokenizer, bcfg, out / "baselines" / "upcycle" / "train",
                                                  out / "baselines" / "upcycle" / "model", accelerator, cfg.seed,
                                                  "upcycle baseline", {"pipeline": "upcycle-baseline"})
        timings["upcycle_baseline"] = time.time() - t
        evals("upcycle", lambda: load(out / "baselines" / "upcycle" / "model")[0])
    if bl.dense_ft:
        t = time.time()
        baseline_info["dense_ft"] = _dense_ft_once(base, train_ds, tokenizer, cfg, budget,
                                                   out / "baselines" / "dense_ft", accelerator)
        timings["dense_ft_baseline"] = time.time() - t
        evals("dense_ft", lambda: load(out / "baselines" / "dense_ft" / "model")[0])

    report: dict[str, Any] = {}
    if main:
        val_rows = read_table(cfg.data.val)
        report = {
            "models": evals.results,
            "config": to_dict(cfg),
            "timings": {k: round(v, 1) for k, v in timings.items()},
            "mcl": [io.read_json(out / "mcl" / f"stage_{s}" / "stage.json")["clusters"]
                    for s in range(1, len(experts))],
            "expert_distance": [[round(ffn_distance(a, b), 5) for b in experts] for a in experts],
            "budgets": {"router_ft_samples": ft["samples"],
                        "mcl_samples_per_stage": cfg.mcl.train.steps * cfg.mcl.train.global_batch,
                        "dmu_total_samples": ft["samples"] + (len(experts) - 1) * cfg.mcl.train.steps
                        * cfg.mcl.train.global_batch,
                        "baseline_budget_rule": bl.budget,
                        **{f"{k}_samples": v["samples"] for k, v in baseline_info.items()}},
            "expert_usage": expert_usage(load(model_dir)[0], preprocess, tokenizer, cfg.data.val,
                                         max_rows=min(len(val_rows), 512)),
        }
        write_report(out, report)
    accelerator.wait_for_everyone()
    return report


def _stage_model(base: nn.Module, ffn: dict[str, torch.Tensor]) -> nn.Module:
    model = copy.deepcopy(base)
    load_ffn_state_dict(model, ffn)
    return model


def _dense_ft_once(base: nn.Module, ds: CaptionDataset, tokenizer: Callable, cfg: DMUConfig, budget: int,
                   out: Path, accelerator) -> dict:
    """All FFNs of both towers, plain shuffled batches, MCL's hyper-parameters, `budget` samples."""
    done = out / "model" / "config.json"
    if done.exists():
        return io.read_json(done).get("finetune", {})
    model = copy.deepcopy(base)
    tcfg = copy.deepcopy(cfg.mcl.train)
    tcfg.steps = max(1, budget // tcfg.global_batch)
    tcfg.seed = cfg.seed
    result = train(model, ds, tokenizer, tcfg, out / "train", accelerator,
                   trainable=ffn_param_names(model, cfg.mcl.towers, cfg.mcl.blocks), desc="dense FT baseline")
    summary = {k: result[k] for k in ("steps", "samples", "seconds", "skipped")}
    if accelerator.is_main_process:
        save_model_dir(accelerator.unwrap_model(model), out / "model",
                       extra={"pipeline": "dense-ft-baseline", "finetune": {**summary, "history": result["history"]}})
    accelerator.wait_for_everyone()
    return summary


def _finetune_once(model: nn.Module, ds: CaptionDataset, tokenizer: Callable, ft: MoEFinetuneConfig, train_dir: Path,
                   model_dir: Path, accelerator, seed: int, desc: str, extra: dict) -> dict:
    """Fine-tune and save a model directory, unless a finished one is already there."""
    done = model_dir / "config.json"
    if done.exists():
        return io.read_json(done).get("finetune", {})
    result = finetune_moe(model, ds, tokenizer, ft, train_dir, accelerator, seed, desc)
    summary = {k: result[k] for k in ("steps", "samples", "seconds", "skipped")}
    if accelerator.is_main_process:
        save_model_dir(accelerator.unwrap_model(model), model_dir,
                       extra={**extra, "finetune": {**summary, "mode": ft.mode, "history": result["history"]}})
    accelerator.wait_for_everyone()
    return summary


class _Evaluator:
    """Evaluates each named model once (main process) and caches the metrics on disk."""

    def __init__(self, root: Path, preprocess: Callable, tokenizer: Callable, cfg: DMUConfig, main: bool) -> None:
        self.root, self.preprocess, self.tokenizer, self.cfg, self.main = root, preprocess, tokenizer, cfg, main
        self.results: dict[str, Any] = {}

    def __call__(self, name: str, make_model: Callable[[], nn.Module]) -> None:
        path = self.root / f"{name}.json"
        if self.main:
            if not path.exists():
                metrics = evaluate(make_model(), self.preprocess, self.tokenizer, self.cfg.data.val,
                                   batch_size=self.cfg.eval_batch, progress=False)
                io.write_json(path, metrics)
                log.info("%s: mean R@1 %.1f", name, 100 * metrics["mean_R@1"])
            self.results[name] = io.read_json(path)
