"""Fine-tuning an upcycled MoE CLIP: CLIP loss + load-balancing (+ z) loss per tower, on plain
shuffled batches. The published method trains only the routers; the other modes exist for the
baselines (router-only training cannot change an MoE of identical experts) and for ablations."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import nn

from moeclip.data.dataset import CaptionDataset
from moeclip.moe import aux_losses, set_trainable
from moeclip.runtime import Runtime
from moeclip.train.loop import TrainConfig, train


def _router_train_default() -> TrainConfig:
    return TrainConfig(steps=150, lr=1e-3, weight_decay=0.0, warmup_steps=15, ckpt_every=50)


@dataclass
class MoEFinetuneConfig:
    mode: Literal["router", "router+experts", "full"] = "router"
    # router+experts: keep a shared expert (upcycle.shared_expert) at the base's weights while the rest trains
    freeze_shared: bool = False
    lb_coef: float = 0.01
    z_coef: float = 0.0
    train: TrainConfig = field(default_factory=_router_train_default)


def moe_aux_loss(lb_coef: float, z_coef: float) -> Callable[[nn.Module], tuple[torch.Tensor, dict[str, float]]]:
    """Sum over towers of lb_coef * LB + z_coef * z; each tower's loss is already a mean over its layers."""
    def aux(model: nn.Module) -> tuple[torch.Tensor, dict[str, float]]:
        total: torch.Tensor | None = None  # starts on the losses' device (no CPU scalar on a GPU graph)
        metrics = {}
        for tower, losses in aux_losses(model).items():
            term = lb_coef * losses["lb"] + z_coef * losses["z"]
            total = term if total is None else total + term
            metrics[f"lb_{tower}"] = float(losses["lb"].detach())
            if z_coef:
                metrics[f"z_{tower}"] = float(losses["z"].detach())
        return (total if total is not None else torch.zeros(())), metrics
    return aux


def finetune_moe(model: nn.Module, dataset: CaptionDataset, tokenizer: Callable, cfg: MoEFinetuneConfig,
                 out_dir: str | Path, runtime: Runtime, seed: int = 0, desc: str = "router FT") -> dict:
    names = set_trainable(model, cfg.mode, cfg.freeze_shared)
    tcfg = TrainConfig(**{**cfg.train.__dict__, "seed": seed})
    return train(model, dataset, tokenizer, tcfg, out_dir, runtime, trainable=names,
                 aux_loss=moe_aux_loss(cfg.lb_coef, cfg.z_coef), desc=desc)
