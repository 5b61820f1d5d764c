"""The whole DMU pipeline behind `accelerate launch recipes/dmu.py`:

base -> MCL stages (experts) -> upcycle -> router fine-tuning -> evaluation of the base, every
stage model, the copy-upcycling baseline and the DMU model -> report.json / report.md / model/.
`construction=drop_upcycle` builds model/ by Drop-Upcycling instead (no MCL; moeclip.pipeline.constructions).
Every step leaves files that mark it done, so re-running the same command resumes.
"""
from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn

from moeclip import io
from moeclip.config import to_dict
from moeclip.data.dataset import CaptionDataset, Collate
from moeclip.data.formats import data_format, has_factor_columns, open_dataset
from moeclip.eval.evaluate import find_factors
from moeclip.loader import load, save_model_dir
from moeclip.model.ffn import ffn_distance, ffn_param_names, load_ffn_state_dict
from moeclip.moe import upcycle
from moeclip.moe.novelty import novelty_gates
from moeclip.moe.router import DEFAULT_ROUTER_INIT_STD
from moeclip.pipeline.common import DataConfig, ModelConfig, ensure_data, environment, load_base, open_train_data
from moeclip.pipeline.constructions import check_construction, construction_ft, construction_ft_default, dmu_budget
from moeclip.pipeline.costs import model_costs
from moeclip.pipeline.evaluator import Evaluator
from moeclip.analysis import analyse_experts, write_expert_report
from moeclip.pipeline.plots import write_plots
from moeclip.pipeline.report import write_report
from moeclip.runtime import Runtime
from moeclip.train.dist import DistributedConfig, make_runtime
from moeclip.train.mcl_stages import MCLConfig, run_mcl
from moeclip.train.novelty_fit import fit_novelty_gates, gate_shares
from moeclip.train.loop import require_finished, train
from moeclip.train.moe_finetune import MoEFinetuneConfig, finetune_moe
from moeclip.train.specialists import init_routers_from_partitions
from moeclip.train.tracking import LoggingConfig, configure, eval_values, open_step

log = logging.getLogger(__name__)


@dataclass
class UpcycleConfig:
    top_k: int = 2
    layers: list[int] | None = None    # blocks that become MoE (None = all)
    jitter: float = 0.0
    router_init_std: float = DEFAULT_ROUTER_INIT_STD  # 0.0: the all-zero gate (tied top-k; moeclip.moe.router)
    # keep the base FFN as an always-on shared expert behind a learned per-token gate (moeclip.moe.layer.MoEFFN),
    # in every upcycled model of the run (DMU, its ablation, the upcycling baselines)
    shared_expert: bool = False
    # how the shared expert is mixed in: "learned" (per-token fusion gate) or "novelty" (per sample, not learned:
    # samples unlike the training data go to the base FFN; moeclip.moe.novelty). Pair with a frozen shared expert
    # (construction_ft.freeze_shared=true) to keep the base's FFN exact for them.
    shared_gate: Literal["learned", "novelty"] = "learned"
    novelty_quantile: float = 0.99     # share of (held-out) training samples the gate keeps on the routed experts
    novelty_clusters: int = 1024       # centroids of the training data's tokens, per tower
    drop_ratio: float = 0.5            # construction=drop_upcycle: share of each expert's hidden units re-drawn


def _baseline_default() -> MoEFinetuneConfig:
    return MoEFinetuneConfig(mode="router+experts")


@dataclass
class BaselinesConfig:
    upcycle: bool = True               # copy-upcycling: every expert a copy of the dense FFN
    upcycle_finetune: MoEFinetuneConfig = field(default_factory=_baseline_default)
    dense_ft: bool = True              # continued fine-tuning of all FFNs, plain batches (MCL's hyper-parameters)
    dense_ft_lr: float | None = None   # its own learning rate (None = MCL's), so a sweep can tune each baseline
    # "total": each baseline trains on as many samples as DMU used in all (MCL stages + router FT);
    # "router_ft": only as many as DMU's router fine-tuning
    budget: Literal["total", "router_ft"] = "total"
    dmu_router_experts: bool = True    # also report DMU with routers + experts trained (an ablation)
    # Drop-Upcycling (moeclip.moe.drop): copies with drop_ratio of each expert's hidden units re-drawn, trained
    # as the upcycle baseline (upcycle_finetune, same budget)
    drop_upcycle: bool = False
    drop_ratio: float = 0.5
    drop_upcycle_lr: float | None = None  # its own learning rate (None = upcycle_finetune's)


@dataclass
class DMUConfig:
    base: str = "checkpoints/base-tiny"
    output_dir: str = "runs/dmu"
    # where the MCL stages live (None = OUTPUT_DIR/mcl); point at another run's stages to ablate what comes
    # after them (experts, top-k, router training) without re-training them: settings must match (checked)
    mcl_dir: str | None = None
    seed: int = 0
    eval_batch: int = 256
    # how model/ is built: dmu = MCL experts + routers, the published method; drop_upcycle = Drop-Upcycling
    # (copies of the base with upcycle.drop_ratio of each expert re-drawn, trained with construction_ft), no MCL
    construction: Literal["dmu", "drop_upcycle"] = "dmu"
    # retrieval protocol of every evaluation (moeclip.eval.retrieval): per_caption = papers / CLIP_benchmark;
    # multi_positive = identical captions merged (how docs/results.md's tables were made)
    eval_protocol: Literal["per_caption", "multi_positive"] = "per_caption"
    # expert analysis of the final model (`moeclip experts`); "auto" groups by the base's weakest factor
    experts_group_by: str | None = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # e.g. model.context_length=248 for long captions
    mcl: MCLConfig = field(default_factory=MCLConfig)
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)
    router_ft: MoEFinetuneConfig = field(default_factory=MoEFinetuneConfig)
    # construction=drop_upcycle's training; its train.steps is ignored (set from DMU's sample budget)
    construction_ft: MoEFinetuneConfig = field(default_factory=construction_ft_default)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # docs/distributed.md
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # trackers, OUTPUT_DIR/logs/<step>/ (docs/usage.md)


def run_dmu(cfg: DMUConfig) -> dict[str, Any]:
    runtime = make_runtime(cfg.distributed)
    env = environment(runtime)  # at the start: the code that trains, not whatever is checked out at the end
    main = runtime.is_main
    out = Path(cfg.output_dir)
    started = time.time()
    model_dir = out / "model"
    check_construction(cfg, model_dir)
    configure(runtime.trainer, cfg.logging, out)
    eval_log = open_step(runtime.trainer, "eval")
    ensure_data(cfg.data, main)
    runtime.barrier()
    torch.manual_seed(cfg.seed)
    base, preprocess, tokenizer = load_base(cfg.base, cfg.model)  # stretched once, here: every step sees it
    train_ds = open_train_data(cfg.data, preprocess)
    read_skips = dict(train_ds.skips.counts)  # found when the data was opened, before any image is read
    factors = find_factors(cfg.data.train) if has_factor_columns(cfg.data.train) else None
    factor_columns = ({f: train_ds.column(f) for f in factors["factors"]} if factors else None)
    evals = Evaluator(out / "evals", preprocess, tokenizer, cfg.data.val, cfg.eval_batch, runtime, cfg.data.image_root,
                      cfg.data.workers, cfg.data.also_val, cfg.eval_protocol,
                      on_result=lambda name, m: eval_log.log(eval_values(name, m), step=0))

    mcl_dir = Path(cfg.mcl_dir) if cfg.mcl_dir else out / "mcl"
    bl = cfg.baselines
    main_name = cfg.construction
    if cfg.construction == "dmu":
        experts = run_mcl(base, train_ds, tokenizer, cfg.mcl, mcl_dir, runtime, cfg.seed, factor_columns)
        num_experts = len(experts)
        evals("base", lambda: base)
        for s in range(1, len(experts)):
            evals(f"mcl_stage_{s}", lambda s=s: _stage_model(base, experts[s]))

        def make_dmu() -> nn.Module:
            model = _gated(_upcycled(base, experts, len(experts), cfg), cfg, train_ds, tokenizer, runtime)
            return _seed_routers(model, cfg, mcl_dir, train_ds, tokenizer, runtime)

        ft = _finetune_once(make_dmu, train_ds, tokenizer, cfg.router_ft, out / "router_ft", model_dir, runtime,
                            cfg.seed, "DMU router FT", {"pipeline": "dmu", "config": to_dict(cfg)})
        budget = ft["samples"] + (len(experts) - 1) * cfg.mcl.train.steps * cfg.mcl.train.global_batch
        if bl.budget == "router_ft":
            budget = ft["samples"]
    else:  # drop_upcycle: no MCL; trained on the samples DMU would have used
        experts, num_experts, budget = [], cfg.mcl.num_experts, dmu_budget(cfg)
        evals("base", lambda: base)
        ft = _finetune_once(lambda: _gated(_upcycled(base, None, num_experts, cfg, cfg.upcycle.drop_ratio), cfg,
                                           train_ds, tokenizer, runtime), train_ds,
                            tokenizer, construction_ft(cfg, budget), out / "construction_ft", model_dir, runtime,
                            cfg.seed, "drop_upcycle construction", {"pipeline": main_name, "config": to_dict(cfg)})
    evals(main_name, lambda: load(model_dir)[0])

    baseline_info = {}
    if bl.dmu_router_experts and not experts:
        log.info("baselines.dmu_router_experts skipped: it re-trains DMU's MCL experts, and construction=%s has none",
                 cfg.construction)
    elif bl.dmu_router_experts:
        xcfg = copy.deepcopy(cfg.router_ft)
        xcfg.mode = "router+experts"
        xcfg.train.lr = bl.upcycle_finetune.train.lr
        baseline_info["dmu_router_experts"] = _finetune_once(
            make_dmu, train_ds, tokenizer, xcfg, out / "ablations" / "dmu_router_experts" / "train",
            out / "ablations" / "dmu_router_experts" / "model", runtime, cfg.seed, "DMU router+experts",
            {"pipeline": "dmu-router+experts"})
        evals("dmu_router_experts", lambda: load(out / "ablations" / "dmu_router_experts" / "model")[0])
    copies = {"upcycle": 0.0} if bl.upcycle else {}
    if bl.drop_upcycle:
        copies["drop_upcycle"] = bl.drop_ratio
    for name, drop_ratio in copies.items():  # copy-upcycling, and Drop-Upcycling: same training, same budget
        bcfg = copy.deepcopy(bl.upcycle_finetune)
        bcfg.train.steps = max(1, budget // bcfg.train.global_batch)
        if name == "drop_upcycle" and bl.drop_upcycle_lr is not None:
            bcfg.train.lr = bl.drop_upcycle_lr
        bdir = out / "baselines" / name
        baseline_info[name] = _finetune_once(lambda r=drop_ratio: _gated(_upcycled(base, None, num_experts, cfg, r),
                                                                         cfg, train_ds, tokenizer, runtime),
                                             train_ds, tokenizer, bcfg, bdir / "train", bdir / "model", runtime,
                                             cfg.seed, f"{name} baseline", {"pipeline": f"{name}-baseline"})
        evals(name, lambda bdir=bdir: load(bdir / "model")[0])
    if bl.dense_ft:
        baseline_info["dense_ft"] = _dense_ft_once(base, train_ds, tokenizer, cfg, budget,
                                                   out / "baselines" / "dense_ft", runtime)
        evals("dense_ft", lambda: load(out / "baselines" / "dense_ft" / "model")[0])

    report: dict[str, Any] = {}
    if main:
        steps = _step_records(out, mcl_dir, len(experts), main_name)
        main_budgets = ({"router_ft_samples": ft["samples"],
                         "mcl_samples_per_stage": cfg.mcl.train.steps * cfg.mcl.train.global_batch,
                         "dmu_total_samples": ft["samples"] + (len(experts) - 1) * cfg.mcl.train.steps
                         * cfg.mcl.train.global_batch}
                        if experts else {"budget_samples": budget, f"{main_name}_samples": ft["samples"]})
        report = {
            "models": evals.results,
            "data": _data_summary(cfg.data.train, len(train_ds), read_skips, mcl_dir),
            **({"also_val": evals.also_results} if evals.also_results else {}),
            "protocol": cfg.eval_protocol,
            "construction": cfg.construction,
            "config": to_dict(cfg),
            "environment": env,
            "timings": {**{k: v["seconds"] for k, v in steps.items()},
                        "this_invocation_wall": round(time.time() - started, 1)},
            **({"mcl": [io.read_json(mcl_dir / f"stage_{s}" / "stage.json")["clusters"]
                        for s in range(1, len(experts))],
                "expert_distance": [[round(ffn_distance(a, b), 5) for b in experts] for a in experts]}
               if experts else {}),
            "budgets": {**main_budgets, "baseline_budget_rule": bl.budget,
                        **{f"{k}_samples": v["samples"] for k, v in baseline_info.items()}},
        }
        report["costs"] = model_costs(base, lambda r: _upcycled(base, None, num_experts, cfg, r), cfg,
                                      max(len(experts) - 1, 0), len(train_ds),
                                      {main_name: ft["samples"], **{k: v["samples"] for k, v in baseline_info.items()}})
        final = load(model_dir)[0]
        report.update(_analyse(final, preprocess, tokenizer, cfg, evals.results["base"], out, runtime))
        if novelty_gates(final):  # where the gates send each validation set (the old domain should go to the base)
            report["novelty_gate"] = {
                name: gate_shares(final, open_dataset(path, preprocess, image_root=cfg.data.image_root), tokenizer,
                                  runtime) for name, path in {"main": cfg.data.val, **cfg.data.also_val}.items()}
        report["plots"] = write_plots(out, evals.results, {k: v["history"] for k, v in steps.items() if v["history"]},
                                      cfg.eval_protocol)
        report["logs"] = str(runtime.trainer.moeclip_logging[1])
        write_report(out, report)
    eval_log.close()
    runtime.barrier()
    return report


def _data_summary(train: str, rows: int, read_skips: dict[str, int], mcl_dir: Path) -> dict[str, Any]:
    """The training data and every sample it lost: those skipped when it was opened (no caption, no image member,
    ...) plus the images the first embedding pass could not decode (each unique image is read there once; its
    counts are committed with its progress, so a resumed run reports the same)."""
    skipped = Counter(read_skips)
    progress = mcl_dir / "stage_1" / "features" / "progress.json"
    if progress.exists():
        skipped.update(io.read_json(progress).get("skipped", {}))
    return {"train": str(train), "format": data_format(train), "rows": rows, "skipped": dict(sorted(skipped.items()))}


def _step_records(out: Path, mcl_dir: Path, num_experts: int, main: str = "dmu") -> dict[str, dict[str, Any]]:
    """{step: {seconds, history}} of every training step that ran, read from the files that mark it done (so a
    resumed run reports the real durations and the whole loss history); `num_experts` 0: no MCL stages ran."""
    t: dict[str, dict[str, Any]] = {}
    for s in range(1, num_experts):
        stage = io.read_json(mcl_dir / f"stage_{s}" / "stage.json")
        t[f"mcl_stage_{s}_embed_cluster"] = {"seconds": stage["seconds"]["embed_and_cluster"], "history": []}
        t[f"mcl_stage_{s}_train"] = {"seconds": stage["seconds"]["train"], "history": stage["train"]["history"]}
    for name, cfg_path in (("router_ft" if main == "dmu" else main, out / "model"),
                           ("dmu_router_experts", out / "ablations" / "dmu_router_experts" / "model"),
                           ("upcycle", out / "baselines" / "upcycle" / "model"),
                           ("drop_upcycle", out / "baselines" / "drop_upcycle" / "model"),
                           ("dense_ft", out / "baselines" / "dense_ft" / "model")):
        if (cfg_path / "config.json").exists():
            ft = io.read_json(cfg_path / "config.json").get("finetune", {})
            t[name] = {"seconds": ft.get("seconds"), "history": ft.get("history", [])}
    return t


def _analyse(model: nn.Module, preprocess: Callable, tokenizer: Callable, cfg: DMUConfig, base_metrics: dict,
             out: Path, runtime: Runtime) -> dict[str, Any]:
    """`moeclip experts` on the final model (rank 0, its accelerator; a bounded sample of rows, so seconds even
    for ViT-L); the report links its pictures."""
    group = cfg.experts_group_by
    if group == "auto":
        factors = base_metrics.get("factors") or {}
        group = min(factors, key=factors.get) if factors else None
    result = analyse_experts(model, preprocess, tokenizer, cfg.data.val, group_by=group, progress=False,
                             runtime=runtime, image_root=cfg.data.image_root)
    paths = write_expert_report(result, out / "experts")
    usage = [{k: layer[k] for k in ("tower", "block", "load", "top1", "load_cv")}
             | ({"mi_bits": layer["groups"]["mi_bits"], "mi_null_p95_bits": layer["groups"]["mi_null_p95_bits"]}
                if "groups" in layer else {}) for layer in result["layers"]]
    return {"expert_usage": usage, "expert_group_by": group,
            "expert_pictures": {k: str(p.relative_to(out)) for k, p in paths.items() if p.suffix == ".png"}}


def _upcycled(base: nn.Module, experts: list[dict[str, torch.Tensor]] | None, num_experts: int,
              cfg: DMUConfig, drop_ratio: float = 0.0) -> nn.Module:
    """A copy of `base` upcycled; the routers' random init comes from `cfg.seed` alone (not from how much of
    the global RNG earlier steps used), so a run resumed after MCL starts its routers where a fresh one does."""
    u = cfg.upcycle
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return upcycle(copy.deepcopy(base), experts, num_experts=num_experts, top_k=u.top_k, layers=u.layers,
                       towers=cfg.mcl.towers, jitter=u.jitter, router_init_std=u.router_init_std,
                       drop_ratio=drop_ratio, shared_expert=u.shared_expert, shared_gate=u.shared_gate,
                       novelty_clusters=u.novelty_clusters)


def _gated(model: nn.Module, cfg: DMUConfig, ds: CaptionDataset, tokenizer: Callable, runtime: Runtime) -> nn.Module:
    """A novelty-gated shared expert learns the training data's tokens before any training (seeded: a resumed run
    fits the same gate)."""
    if cfg.upcycle.shared_gate == "novelty":
        fit_novelty_gates(model, ds, tokenizer, runtime, seed=cfg.seed, quantile=cfg.upcycle.novelty_quantile)
    return model


def _seed_routers(model: nn.Module, cfg: DMUConfig, mcl_dir: Path, ds: CaptionDataset, tokenizer: Callable,
                  runtime: Runtime) -> nn.Module:
    """Specialist experts: routers start from their partitions' centroids (c-BTM); DMU's keep their init."""
    if cfg.mcl.construction == "specialists":
        init_routers_from_partitions(model, ds, io.load_npy(mcl_dir / "stage_0" / "groups.npy"), Collate(tokenizer),
                                     runtime, seed=cfg.seed)
    return model


def _stage_model(base: nn.Module, ffn: dict[str, torch.Tensor]) -> nn.Module:
    model = copy.deepcopy(base)
    load_ffn_state_dict(model, ffn)
    return model


def _dense_ft_once(base: nn.Module, ds: CaptionDataset, tokenizer: Callable, cfg: DMUConfig, budget: int,
                   out: Path, runtime: Runtime) -> dict:
    """All FFNs of both towers, plain shuffled batches, MCL's hyper-parameters, `budget` samples."""
    done = out / "model" / "config.json"
    if done.exists():
        return io.read_json(done).get("finetune", {})
    model = copy.deepcopy(base)
    tcfg = copy.deepcopy(cfg.mcl.train)
    tcfg.steps = max(1, budget // tcfg.global_batch)
    tcfg.seed = cfg.seed
    if cfg.baselines.dense_ft_lr is not None:
        tcfg.lr = cfg.baselines.dense_ft_lr
    result = train(model, ds, tokenizer, tcfg, out / "train", runtime,
                   trainable=ffn_param_names(model, cfg.mcl.towers, cfg.mcl.blocks), desc="dense FT baseline")
    require_finished(result, tcfg, "dense FT baseline")
    summary = {k: result[k] for k in ("steps", "samples", "seconds", "skipped")}
    if runtime.is_main:
        save_model_dir(model, out / "model",
                       extra={"pipeline": "dense-ft-baseline",
                              "finetune": {**summary, "lr": tcfg.lr, "history": result["history"]}})
    runtime.barrier()
    return summary


def _finetune_once(make_model: Callable[[], nn.Module], ds: CaptionDataset, tokenizer: Callable,
                   ft: MoEFinetuneConfig, train_dir: Path, model_dir: Path, runtime: Runtime, seed: int, desc: str,
                   extra: dict) -> dict:
    """Build, fine-tune and save a model directory, unless a finished one is already there (then nothing is
    built: a resumed run skips the upcycling copy and the routers' seeding). The model lives only here, so it
    is freed before the next step trains (holding each trained model doubled the peak memory)."""
    done = model_dir / "config.json"
    if done.exists():
        return io.read_json(done).get("finetune", {})
    model = make_model()
    result = finetune_moe(model, ds, tokenizer, ft, train_dir, runtime, seed, desc)
    require_finished(result, ft.train, desc)
    summary = {k: result[k] for k in ("steps", "samples", "seconds", "skipped")}
    if runtime.is_main:
        save_model_dir(model, model_dir,
                       extra={**extra, "finetune": {**summary, "mode": ft.mode, "lr": ft.train.lr,
                                                    "history": result["history"]}})
    runtime.barrier()
    return summary
