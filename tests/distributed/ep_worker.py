"""Runs under `accelerate launch` (2 processes, a DeepSpeed config) for test_expert_parallel.py.

Part 1, one layer: the expert-parallel layer against a local `MoEFFN` with the same weights and
this rank's inputs (outputs, aux losses, input/router gradients; an expert's gradient against the
sum over ranks of the local ones, which is what the owner of that expert receives).
Part 2, training: `train()` of the saved MoE model for each run of OUT/train_cfg.json, launched
once per entry of its "launches" (stop_at values; [2, None] = stop after step 2, then a new model
and engine resume); the weights and the first step's gradients are saved for the test.
Results go to OUT/*.json; the test asserts.
"""
import copy
import json
import os
import sys
from collections import OrderedDict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist
from torch import nn

from moeclip.train.dist import DistributedConfig, finish, make_runtime


def layer_check(num_experts: int, rank: int) -> dict:
    from moeclip.distributed.expert_parallel import gather_moe_layers, shard_moe_layers
    from moeclip.moe import MoEFFN, aux_losses

    torch.manual_seed(0)
    d = 16
    mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(d, 32), gelu=nn.GELU(), c_proj=nn.Linear(32, d)))
    layer = MoEFFN.from_dense(mlp, num_experts, top_k=2, router_init_std=0.5)
    with torch.no_grad():
        for e in layer.experts:
            for p in e.parameters():
                p.add_(0.1 * torch.randn_like(p))

    class Holder(nn.Module):  # aux_losses looks layers up by module name
        def __init__(self, mlp: nn.Module) -> None:
            super().__init__()
            self.transformer = nn.Module()
            self.transformer.mlp = mlp

    ref, ep = Holder(copy.deepcopy(layer)), Holder(copy.deepcopy(layer))
    shard_moe_layers(ep, 2)
    gen = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(5, 7, d, generator=gen)
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[:, 4 + rank:] = False  # padding: ranks differ in their real-token counts
    out, losses = {}, {}
    for name, model in (("ref", ref), ("ep", ep)):
        model.transformer.mlp.token_mask = mask
        xi = x.clone().requires_grad_()
        y = model.transformer.mlp(xi)
        aux = aux_losses(model)["text"]
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(99 + rank))
        ((y * g).sum() + aux["lb"] + 0.1 * aux["z"]).backward()
        out[name], losses[name] = (y.detach(), xi.grad), {k: float(v) for k, v in aux.items()}
    r, e_layer = ref.transformer.mlp, ep.transformer.mlp.experts  # the expert-parallel backend
    result = {"out": (out["ref"][0] - out["ep"][0]).abs().max().item(),
              "input_grad": (out["ref"][1] - out["ep"][1]).abs().max().item(),
              "router_grad": (r.router.proj.weight.grad - ep.transformer.mlp.router.proj.weight.grad).abs().max().item(),
              "lb": abs(losses["ref"]["lb"] - losses["ep"]["lb"]), "z": abs(losses["ref"]["z"] - losses["ep"]["z"]),
              "expert_grad": 0.0, "experts_checked": []}
    for e in range(num_experts):
        summed = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                  for n, p in r.experts[e].named_parameters()}
        for t in summed.values():
            dist.all_reduce(t)
        owner, local = divmod(e, e_layer.num_local_experts)
        if owner == e_layer.ep_rank:
            for n, p in e_layer.local_experts[local].named_parameters():
                result["expert_grad"] = max(result["expert_grad"], (summed[n] - p.grad).abs().max().item())
            result["experts_checked"].append(e)
    gather_moe_layers(ep)
    result["gathered"] = max((a - b).abs().max().item() for a, b in zip(ep.state_dict().values(),
                                                                       ref.state_dict().values()))
    result["gathered_type"] = type(ep.transformer.mlp).__name__
    return result


CURRENT = {"run": ""}


def record_first_grads(out: Path) -> None:
    """Make every train() call save its first step's gradients (averaged over ranks, before clipping)."""
    from deepspeed.utils import safe_get_full_grad

    from moeclip.distributed.engine import DeepSpeedBackend
    from moeclip.distributed.expert_parallel import DS_EXPERTS, is_expert_parallel
    from moeclip.moe import MoEFFN

    step = DeepSpeedBackend.step

    def recording_step(self, params, grad_clip, optimizer):
        if self.engine.global_steps == 0:
            model, grads = self.engine.module, {}
            owners = {name: m.experts for name, m in model.named_modules()
                      if isinstance(m, MoEFFN) and is_expert_parallel(m)}
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                g = safe_get_full_grad(p)  # a collective: every rank, same order
                layer_name = next((n for n in owners if name.startswith(f"{n}.{DS_EXPERTS}.")), None)
                if layer_name is not None:  # local expert i -> global expert id
                    local, rest = name[len(f"{layer_name}.{DS_EXPERTS}."):].split(".", 1)
                    name = f"{layer_name}.experts.{owners[layer_name].global_expert(int(local))}.{rest}"
                if g is not None:
                    grads[name] = g.detach().clone().reshape(p.shape)
            torch.save(grads, out / f"grads_{CURRENT['run']}_rank{dist.get_rank()}.pt")
        step(self, params, grad_clip, optimizer)

    DeepSpeedBackend.step = recording_step


def training(out: Path, model_dir: str, train_csv: str, cfg: dict, runtime) -> dict:
    from moeclip import load
    from moeclip.data.dataset import CaptionDataset
    from moeclip.loader import save_model_dir
    from moeclip.train.loop import TrainConfig, latest_checkpoint
    from moeclip.train.moe_finetune import MoEFinetuneConfig, finetune_moe

    info = {}
    for run in cfg["runs"]:
        CURRENT["run"] = run["name"]
        for stop_at in run["launches"]:  # e.g. [2, None]: a stopped run, then a new model + engine resuming it
            model, pre, tok = load(model_dir)
            ds = CaptionDataset(train_csv, pre)
            tcfg = TrainConfig(**{**run["train"], "stop_at": stop_at})
            ft = MoEFinetuneConfig(mode=run["mode"], lb_coef=run["lb_coef"], z_coef=run["z_coef"], train=tcfg)
            res = finetune_moe(model, ds, tok, ft, out / run["name"], runtime, seed=0, desc=run["name"])
        ckpt = latest_checkpoint(out / run["name"])
        info[run["name"]] = {"steps": res["steps"], "backend": res["backend"], "ckpt": str(ckpt),
                             "history": res["history"]}
        if runtime.is_main:
            save_model_dir(model, out / f"{run['name']}_model")
        runtime.barrier()
    return info


def main() -> int:
    out, model_dir, train_csv = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    cfg = json.loads((out / "train_cfg.json").read_text())
    runtime = make_runtime(DistributedConfig(ep_size=2))
    accelerator = runtime.trainer
    rank = runtime.rank
    result = {"world": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
              "backend": dist.get_backend()}
    if not cfg.get("skip_layer"):
        result["layer"] = {e: layer_check(e, rank) for e in (4, 3)}
    record_first_grads(out)
    result["training"] = training(out, model_dir, train_csv, cfg, runtime)
    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    finish(main())
