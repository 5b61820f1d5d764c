"""The pipeline's main model built another way than DMU: `construction=drop_upcycle` (Drop-Upcycling, no MCL).

Kept apart from moeclip.pipeline.dmu, which stays the published method's one readable path: here are the
construction's default training, the sample budget DMU would have used (read from the config, since no MCL
runs), and the guards that keep one OUTPUT_DIR to one construction.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from moeclip import io
from moeclip.config import ConfigError
from moeclip.train.loop import TrainConfig
from moeclip.train.moe_finetune import MoEFinetuneConfig

LABELS = {"dmu": "DMU", "drop_upcycle": "Drop-Upcycling"}  # how reports name each construction's main model
BUILT = {"drop_upcycle": "the base upcycled with `upcycle.drop_ratio` of each expert's hidden units re-drawn, "
                         "routers and experts trained with `construction_ft` on the samples DMU would have used, "
                         "no MCL stages"}  # report.md's first lines


def construction_ft_default() -> MoEFinetuneConfig:
    """construction=drop_upcycle: routers and experts trained; `train.steps` is set from the budget."""
    return MoEFinetuneConfig(mode="router+experts", lb_coef=0.01,
                             train=TrainConfig(steps=150, global_batch=128, lr=3e-3, weight_decay=0.0,
                                               warmup_steps=15, ckpt_every=50))


def dmu_budget(cfg: Any) -> int:
    """The training samples DMU would use with this config: its MCL stages plus its router fine-tuning, or
    only the latter when `baselines.budget` is "router_ft" (what each baseline then trains on)."""
    router = cfg.router_ft.train.steps * cfg.router_ft.train.global_batch
    if cfg.baselines.budget == "router_ft":
        return router
    return (cfg.mcl.num_experts - 1) * cfg.mcl.train.steps * cfg.mcl.train.global_batch + router


def construction_ft(cfg: Any, budget: int) -> MoEFinetuneConfig:
    """`construction_ft` with its steps set so the main model trains on `budget` samples."""
    ft = copy.deepcopy(cfg.construction_ft)
    ft.train.steps = max(1, budget // ft.train.global_batch)
    return ft


def check_construction(cfg: Any, model_dir: Path) -> None:
    """Refuse settings that cannot go together, and an OUTPUT_DIR whose model/ another construction made
    (resuming would report that model under this construction's name)."""
    if cfg.construction == "drop_upcycle":  # MCL-only switches would be ignored without a word: refuse them
        mcl_only = {"mcl_dir": cfg.mcl_dir is not None, "mcl.start_from": cfg.mcl.start_from != "base",
                    "mcl.construction": cfg.mcl.construction != "stages"}
        given = [k for k, v in mcl_only.items() if v]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply to DMU's MCL stages, and construction=drop_upcycle "
                              "runs none: add construction=dmu (recipes/configs/default.yaml picks drop_upcycle)")
    if cfg.construction == "drop_upcycle" and cfg.baselines.drop_upcycle:
        raise ConfigError("construction=drop_upcycle with baselines.drop_upcycle=true would train the same model "
                          "twice: set baselines.drop_upcycle=false (the main model is the Drop-Upcycling one)")
    if cfg.upcycle.shared_gate == "novelty" and not cfg.upcycle.shared_expert:
        raise ConfigError("upcycle.shared_gate=novelty gates the shared expert, and upcycle.shared_expert is false: "
                          "add upcycle.shared_expert=true (and construction_ft.freeze_shared=true to keep the base's "
                          "FFN for what the gate sends it)")
    done = model_dir / "config.json"
    made = io.read_json(done).get("pipeline") if done.exists() else None
    if made is not None and made != cfg.construction:
        raise ConfigError(f"{model_dir} was made by construction={made}, but this run has "
                          f"construction={cfg.construction}: use another output_dir, or construction={made} to "
                          "resume that run")
