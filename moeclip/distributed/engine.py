"""The training loop's DeepSpeed backend: what changes when `accelerate launch` runs a DeepSpeed config.

The loop stays one loop; this object does the parts DeepSpeed owns. Before the engine exists it
shards MoE layers over the expert-parallel group, makes 0-dim parameters 1-element (the engine
broadcasts parameters as bytes and fails on 0-dim ones, e.g. open_clip's `logit_scale`) and splits
optimizer groups into dense and expert groups. The engine then does gradient accumulation,
clipping (global norm over dense and expert gradients) and the step, and writes its own sharded
checkpoint (one file per expert). Afterwards the model is handed back as it came in, whole on
every rank, with the trained weights.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from moeclip import io
from moeclip.distributed import ANCHOR, CLIENT_KEY, DS_DIR, DS_TAG
from moeclip.distributed.expert_parallel import gather_moe_layers, resolve_ep_size, shard_moe_layers
from moeclip.moe.upcycle import moe_config, moe_layers

log = logging.getLogger(__name__)


def using_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _zero_stage(accelerator: Accelerator) -> int:
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


class DeepSpeedBackend:
    """Set-up, step, checkpoint and teardown of one `train()` call under a DeepSpeed launch."""

    name = "deepspeed"

    def __init__(self, accelerator: Accelerator, ep_size: int | None = None) -> None:
        if _zero_stage(accelerator) >= 3:
            raise ValueError("ZeRO stage 3 is not supported (DeepSpeed's native MoE layers do not support it, and "
                             "moeclip reads whole weights between stages); use stage 1 or 2, e.g. "
                             "recipes/accelerate/deepspeed_ep2_zero2.yaml")
        self.accelerator = accelerator
        self.requested_ep = ep_size
        self.ep_size = 1
        self.engine: Any = None
        self._scalars: dict[str, torch.Size] = {}
        self._frozen: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._meta: dict[str, Any] = {}

    # ---- model and optimizer -------------------------------------------------------------------
    def setup(self, model: nn.Module, trainable: list[str]) -> list[str]:
        """Adapt `model` in place; returns the trainable names in the adapted model."""
        self._meta = _describe(model)
        layers = moe_layers(model)
        if layers:
            world = self.accelerator.num_processes
            self.ep_size = resolve_ep_size(self.requested_ep, world, layers[0][2].num_experts)
            renames = shard_moe_layers(model, self.ep_size)
            trainable = [renames.get(n, n) for n in trainable]
            trainable = [n for n in trainable if n is not None]
            trainable += _anchor_if_experts_frozen(model, trainable)
            if self.accelerator.is_main_process:
                log.info("expert parallel: %d experts per layer over ep_size=%d (%d processes)",
                         layers[0][2].num_experts, self.ep_size, world)
        self._meta["ep_size"] = self.ep_size
        self._scalars = _make_scalars_1d(model)
        self._meta["scalar_params"] = sorted(self._scalars)
        self._dtypes = {n: p.dtype for n, p in model.named_parameters()}  # a bf16 engine casts them
        return trainable

    def param_groups(self, named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
        """decay / no-decay groups, each split into dense and expert (per expert group) parts."""
        from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
        groups = [{"name": "decay", "params": [p for _, p in named if p.ndim >= 2], "weight_decay": weight_decay},
                  {"name": "no_decay", "params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if any(is_moe_param(p) for _, p in named):  # expert parameters, or the anchor of frozen ones
            groups = split_params_into_different_moe_groups_for_optimizer(groups)
            groups = [g for g in groups if g["params"]]
            if not any(g.get("moe") for g in groups):
                raise ValueError("an MoE model under DeepSpeed needs a trainable expert-group parameter")
        return groups

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, micro_batch: int, grad_accum: int,
                grad_clip: float) -> tuple[Any, Any]:
        ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = micro_batch
        ds["gradient_accumulation_steps"] = grad_accum
        ds["train_batch_size"] = micro_batch * grad_accum * self.accelerator.num_processes
        ds["gradient_clipping"] = float(grad_clip) if grad_clip > 0 else 0.0
        self.accelerator.gradient_accumulation_steps = grad_accum
        if _low_precision(ds):  # the engine casts frozen weights in place; keep the originals to hand back
            self._frozen = {n: p.data for n, p in model.named_parameters() if not p.requires_grad}
        engine, optimizer = self.accelerator.prepare(model, optimizer)
        self.engine = engine
        return engine, optimizer

    # ---- one optimizer step ----------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        """`loss` is already divided by the number of micro-batches (as in the plain loop)."""
        self.engine.set_gradient_accumulation_boundary(last_micro)
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, params: list[nn.Parameter], grad_clip: float, optimizer: Any) -> None:
        self.engine.step()  # clipping (config "gradient_clipping"), optimizer step, zero_grad

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self, folder: Path, optimizer: Any, scheduler: Any, trainable: list[str]) -> None:
        """Every rank: the engine's sharded checkpoint + this rank's RNG. The loop writes state.json."""
        self.engine.save_checkpoint(str(folder / DS_DIR), tag=DS_TAG, client_state={CLIENT_KEY: self._meta},
                                    save_latest=False)
        rank = self.accelerator.process_index
        extra = {"torch_rng": torch.get_rng_state()}
        if self.accelerator.is_main_process:
            extra["scheduler"] = scheduler.state_dict()
        io.save_torch_state(folder / f"loop_rank{rank}.pt", extra)

    def restore(self, folder: Path, optimizer: Any, scheduler: Any, trainable: list[str], state: dict) -> None:
        run = state.get("run", {})
        here = {"backend": self.name, "world_size": self.accelerator.num_processes, "ep_size": self.ep_size}
        if run.get("backend") != self.name:
            raise ValueError(f"{folder}: checkpoint written without DeepSpeed; relaunch the way it was started, "
                             "or delete it (or change output_dir) to start over")
        if {k: run.get(k) for k in here} != here:
            raise ValueError(f"{folder}: checkpoint written with {run}, this launch is {here}; relaunch with the "
                             "same processes and ep_size, or `moeclip consolidate` it and start a new run from it")
        if sorted(run.get("trainable", [])) != sorted(trainable):
            raise ValueError(f"{folder}: checkpoint trains other parameters than this run; "
                             "delete it or change output_dir")
        self.engine.load_checkpoint(str(folder / DS_DIR), tag=DS_TAG, load_optimizer_states=True,
                                    load_lr_scheduler_states=False)
        extra = io.load_torch_state(folder / f"loop_rank{self.accelerator.process_index}.pt")
        main = io.load_torch_state(folder / "loop_rank0.pt")
        scheduler.load_state_dict(main["scheduler"])
        torch.set_rng_state(extra["torch_rng"])

    def run_info(self, trainable: list[str]) -> dict[str, Any]:
        return {"backend": self.name, "world_size": self.accelerator.num_processes, "ep_size": self.ep_size,
                "trainable": trainable}

    # ---- teardown --------------------------------------------------------------------------------
    def teardown(self, model: nn.Module) -> None:
        """Destroy the engine; give `model` back whole (all experts on every rank), original shapes and dtypes."""
        restored = {**self._fp32_masters(model), **self._frozen}
        self._frozen = {}
        self.accelerator.free_memory()  # also drops accelerate's reference, so the next train() gets a new engine
        self.engine = None
        with torch.no_grad():
            for n, p in model.named_parameters():
                dtype = self._dtypes.get(n, p.dtype)
                if n in restored:
                    p.data = restored[n].to(dtype)
                elif p.dtype != dtype:
                    p.data = p.data.to(dtype)
        gather_moe_layers(model)
        _restore_scalars(model, self._scalars)
        if ANCHOR in model._parameters:
            del model._parameters[ANCHOR]

    def _fp32_masters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Under bf16/fp16 the engine's fp32 master weights, not the rounded module copies (collective)."""
        if all(p.dtype == self._dtypes.get(n, p.dtype) for n, p in model.named_parameters()):
            return {}
        from deepspeed.utils import safe_get_full_fp32_param
        out = {}
        for n, p in model.named_parameters():
            if p.requires_grad:
                full = safe_get_full_fp32_param(p)
                if full is not None:
                    out[n] = full.detach().reshape(p.shape).clone()
        return out


def _low_precision(ds_config: dict) -> bool:
    return any(ds_config.get(k, {}).get("enabled") in (True, "true") for k in ("bf16", "fp16"))


def _anchor_if_experts_frozen(model: nn.Module, trainable: list[str]) -> list[str]:
    """Router-only training: give ZeRO the expert-group parameter it insists on (one zero, no gradient).

    DeepSpeed's ZeRO optimizer asserts that an MoE model has an MoE parameter group and drops empty
    groups, so frozen experts need a stand-in; it never gets a gradient, so it changes neither the
    update nor the clipping norm, and teardown removes it.
    """
    from deepspeed.moe.utils import is_moe_param
    params = dict(model.named_parameters())
    if any(is_moe_param(params[n]) for n in trainable):
        return []
    group = next(m for _, _, m in moe_layers(model)).experts.expert_group_name
    anchor = nn.Parameter(torch.zeros(1, device=next(iter(params.values())).device))
    anchor.allreduce, anchor.group_name = False, group
    model.register_parameter(ANCHOR, anchor)
    return [ANCHOR]


def _describe(model: nn.Module) -> dict[str, Any]:
    """What `moeclip consolidate` needs to rebuild the model from the engine checkpoint alone."""
    arch = getattr(model, "moeclip_arch", None) or {}
    meta: dict[str, Any] = {"arch": arch.get("arch"), "model_cfg": arch.get("model_cfg")}
    if moe_layers(model):
        meta["moe"] = moe_config(model)
    return meta


def _make_scalars_1d(model: nn.Module) -> dict[str, torch.Size]:
    """0-dim parameters become 1-element ones (the engine broadcasts parameters as bytes)."""
    changed = {}
    for name, p in list(model.named_parameters()):
        if p.ndim == 0:
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            setattr(module, attr, nn.Parameter(p.detach().reshape(1).clone(), requires_grad=p.requires_grad))
            changed[name] = p.shape
    return changed


def _restore_scalars(model: nn.Module, shapes: dict[str, torch.Size]) -> None:
    for name, shape in shapes.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        p = getattr(module, attr)
        setattr(module, attr, nn.Parameter(p.detach().reshape(shape).clone(), requires_grad=p.requires_grad))

