"""What a 2-process data-parallel run must equal on one process: shared by the DDP and the expert-parallel tests
(on the test path through `pythonpath` in pyproject.toml)."""
from __future__ import annotations

from pathlib import Path

import torch

from moeclip import load
from moeclip.data.dataset import CaptionDataset
from moeclip.moe import MoEFFN, Routing, load_balancing_loss, router_z_loss, set_trainable
from moeclip.model.ffn import ffn_param_names
from moeclip.moe.losses import module_tower
from moeclip.train.dist import make_runtime
from moeclip.train.loop import PlainBackend, TrainConfig, train


def per_rank_aux(lb_coef: float, z_coef: float, world: int):
    """The router losses as `world` data-parallel ranks compute them: each over its own samples (a
    contiguous 1/world of the micro-batch; tokens are sample-major), averaged as DDP averages gradients."""
    def aux(model: torch.nn.Module) -> tuple[torch.Tensor, dict]:
        per_tower: dict[str, list[torch.Tensor]] = {}
        for name, layer in model.named_modules():
            if not isinstance(layer, MoEFFN) or layer.last_routing is None:
                continue
            r, mask, n = layer.last_routing, layer.last_mask, layer.last_routing.num_tokens // world
            ranks = []
            for h in range(world):
                part = slice(h * n, (h + 1) * n)
                sub = Routing(r.logits[part], r.probs[part], r.weights[part], r.experts[part])
                sub_mask = None if mask is None else mask[part]
                ranks.append(lb_coef * load_balancing_loss(sub, sub_mask, layer.num_experts)
                             + z_coef * router_z_loss(sub, sub_mask))
            per_tower.setdefault(module_tower(name), []).append(torch.stack(ranks).mean())
        return sum(torch.stack(v).mean() for v in per_tower.values()), {}
    return aux


def trainable_names(model: torch.nn.Module, mode: str) -> list[str]:
    """An MoE regime (`set_trainable`), or "ffn": the dense FFNs of both towers (MCL stages, dense FT)."""
    return ffn_param_names(model) if mode == "ffn" else set_trainable(model, mode)


def single_process(moe_dir: Path, corpus: dict, run: dict, out: Path) -> tuple[torch.nn.Module, dict]:
    """Train on one process; returns the model and the first step's gradients (before clipping)."""
    first: dict[str, torch.Tensor] = {}
    step = PlainBackend.step

    def recording_step(self, params, grad_clip, optimizer):
        if not first:
            first.update({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})
        step(self, params, grad_clip, optimizer)

    PlainBackend.step = recording_step
    try:
        model, pre, tok = load(moe_dir)
        train(model, CaptionDataset(corpus["train"], pre), tok, TrainConfig(**run["train"]), out, make_runtime(),
              trainable=trainable_names(model, run["mode"]), aux_loss=per_rank_aux(run["lb_coef"], run["z_coef"], 2))
    finally:
        PlainBackend.step = step
    return model, first


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> tuple[float, str]:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(((sa[k].float() - sb[k].float()).abs().max().item(), k) for k in sa)


