"""One contrastive training loop for every stage of the pipeline (pre-training, MCL stages,
router fine-tuning, baselines): what changes between them is which parameters train, how
batches are grouped, and which auxiliary losses are added.

The same loop runs on one process, under DDP and under DeepSpeed; a backend object does the
parts that differ (model preparation, backward/step, checkpoint files). Under a DeepSpeed launch
the MoE layers become expert-parallel for the duration of the call and come back whole.

Resumable: every `ckpt_every` steps the training state is written into a fresh `ckpt/step_N`
folder that appears (by rename) only when complete; `state.json` inside marks it done.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn
from tqdm import tqdm

from moeclip import io
from moeclip.data.dataset import CaptionDataset, Collate, record_skips
from moeclip.data.sampler import GroupBatchSampler
from moeclip.moe import moe_layers
from moeclip.runtime import Runtime
from moeclip.train.batches import run_loader
from moeclip.train.losses import clip_loss, gather_ids, gather_with_grad, positive_mask

log = logging.getLogger(__name__)

AuxLoss = Callable[[nn.Module], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class TrainConfig:
    steps: int = 1000
    global_batch: int = 128
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.2
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    fixed_logit_scale: float | None = None  # None: the model's own (learned if trainable)
    ckpt_every: int = 200
    log_every: int = 10
    num_workers: int = 0  # DataLoader workers (forked; the columnar rows are shared, not copied)
    pin_memory: bool | None = None  # None: when training on a GPU
    prefetch_factor: int | None = None  # batches each worker reads ahead (None: torch's default, 2)
    seed: int = 0
    stop_at: int | None = None  # leave after this step (checkpointed); re-launching continues the run


class StoppedEarly(Exception):
    """`train.stop_at` ended a step before its last step: the checkpoint is written, the step is not done.
    A recipe leaves (exit 0) instead of treating the half-trained weights as finished; re-running continues."""


def require_finished(result: dict[str, Any], cfg: TrainConfig, what: str) -> None:
    if result["steps"] < cfg.steps:
        raise StoppedEarly(f"{what}: stopped at step {result['steps']} of {cfg.steps} (stop_at); the checkpoint "
                           "is saved, re-run the same command to continue")


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def freeze_except(model: nn.Module, names: list[str]) -> list[nn.Parameter]:
    wanted = set(names)
    params = dict(model.named_parameters())
    unknown = wanted - set(params)
    if unknown:
        raise ValueError(f"trainable parameter '{sorted(unknown)[0]}' does not exist in the model")
    for n, p in params.items():
        p.requires_grad_(n in wanted)
    return [params[n] for n in names]


class PlainBackend:
    """One process or DDP through accelerate: the optimizer is ours, checkpoints are safetensors + torch state."""

    name = "plain"

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.model: nn.Module | None = None

    def setup(self, model: nn.Module, trainable: list[str]) -> list[str]:
        self.model = model
        return trainable

    def param_groups(self, named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
        groups = [{"params": [p for _, p in named if p.ndim >= 2], "weight_decay": weight_decay},
                  {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, micro_batch: int, grad_accum: int,
                grad_clip: float) -> tuple[Any, Any]:
        # DDP: an expert no token picked on a rank in a micro-batch (a zero-initialised router sends every token
        # to the same k experts) gets no gradient there; DDP must not wait for it
        self.accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=bool(moe_layers(model)))
        return self.accelerator.prepare(model, optimizer)

    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        self.accelerator.backward(loss)

    def step(self, params: list[nn.Parameter], grad_clip: float, optimizer: Any) -> None:
        if grad_clip > 0:
            self.accelerator.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def save(self, folder: Path, optimizer: Any, scheduler: Any, trainable: list[str]) -> None:
        if self.accelerator.is_main_process:
            params = dict(self.model.named_parameters())
            io.save_tensors(folder / "trainable.safetensors", {n: params[n] for n in trainable})
            io.save_torch_state(folder / "optim.pt", {"optimizer": optimizer.state_dict(),
                                                      "scheduler": scheduler.state_dict(),
                                                      "torch_rng": torch.get_rng_state()})

    def restore(self, folder: Path, optimizer: Any, scheduler: Any, trainable: list[str], state: dict) -> None:
        if state.get("run", {}).get("backend", self.name) != self.name:
            raise ValueError(f"{folder}: checkpoint written under DeepSpeed; relaunch with the same DeepSpeed "
                             "config, or `moeclip consolidate` it and start a new run from the result")
        weights = io.load_tensors(folder / "trainable.safetensors")
        if sorted(weights) != sorted(trainable):
            raise ValueError(f"{folder}: checkpoint trains other parameters than this run; "
                             "delete it or change output_dir")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, v in weights.items():
                params[n].copy_(v)
        extra = io.load_torch_state(folder / "optim.pt")
        optimizer.load_state_dict(extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["torch_rng"])

    def run_info(self, trainable: list[str]) -> dict[str, Any]:
        return {"backend": self.name, "world_size": self.accelerator.num_processes}

    def teardown(self, model: nn.Module) -> None:
        self.model = None
        self.accelerator.free_memory()  # drop accelerate's references (DDP wrapper, optimizer) to this stage


def make_backend(accelerator: Accelerator) -> Any:
    from moeclip.train.dist import distributed_config
    from moeclip.distributed.engine import DeepSpeedBackend, using_deepspeed
    if using_deepspeed(accelerator):
        return DeepSpeedBackend(accelerator, ep_size=distributed_config(accelerator).ep_size)
    return PlainBackend(accelerator)


def train(model: nn.Module, dataset: CaptionDataset, tokenizer: Callable, cfg: TrainConfig, out_dir: str | Path,
          runtime: Runtime, trainable: list[str], labels: np.ndarray | None = None,
          aux_loss: AuxLoss | None = None, desc: str = "train") -> dict[str, Any]:
    """Train `trainable` params of `model` in place on the runtime's device; return {history, steps, seconds,
    skipped, ...}. The model stays on that device afterwards."""
    out_dir = Path(out_dir)
    accelerator: Accelerator = runtime.trainer
    freeze_except(model, trainable)  # fail on unknown names before any set-up
    sampler = GroupBatchSampler(labels, len(dataset), cfg.global_batch, accelerator.num_processes,
                                accelerator.process_index, cfg.grad_accum, cfg.seed)
    backend = make_backend(accelerator)
    run_trainable = backend.setup(model, trainable)
    params = freeze_except(model, run_trainable)
    optimizer = torch.optim.AdamW(backend.param_groups(list(zip(run_trainable, params)), cfg.weight_decay), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, optimizer = backend.prepare(model, optimizer, sampler.micro_batch, cfg.grad_accum, cfg.grad_clip)

    state: dict[str, Any] = {"step": 0, "history": [], "seconds": 0.0}
    ckpt = latest_checkpoint(out_dir)
    if ckpt is not None:
        state = io.read_json(ckpt / "state.json")
        backend.restore(ckpt, optimizer, scheduler, run_trainable, state)
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
        log.info("%s: resuming from %s (step %d)", desc, ckpt, state["step"])
    state["run"] = backend.run_info(run_trainable)

    unwrapped = accelerator.unwrap_model(engine)
    engine.train()
    collate = Collate(tokenizer)
    device = runtime.device
    image_dtype = next((p.dtype for p in unwrapped.visual.parameters() if p.is_floating_point()), torch.float32)
    step, t_start = state["step"], time.time() - state["seconds"]
    bar = tqdm(total=cfg.steps, initial=step, desc=desc, disable=not accelerator.is_main_process,
               dynamic_ncols=True, leave=False)
    pin = cfg.pin_memory if cfg.pin_memory is not None else device.type == "cuda"
    batches = run_loader(dataset, sampler, step, cfg.steps, collate, cfg.num_workers, pin, cfg.prefetch_factor)
    while step < cfg.steps:
        metrics: dict[str, float] = {}
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        for i, batch in enumerate(micro):
            record_skips(batch, dataset.skips)
            loss, m = _micro_step(engine, unwrapped, batch, dataset, cfg, device, image_dtype, aux_loss)
            backend.backward(loss / len(micro), last_micro=i == len(micro) - 1)
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + v / len(micro)
        backend.step(params, cfg.grad_clip, optimizer)
        scheduler.step()
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            entry = {"step": step, "lr": scheduler.get_last_lr()[0], **{k: round(v, 5) for k, v in metrics.items()}}
            state["history"].append(entry)
            bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3f}")
        stopping = cfg.stop_at is not None and step >= cfg.stop_at
        if step % cfg.ckpt_every == 0 or step == cfg.steps or stopping:
            state.update(step=step, seconds=time.time() - t_start)
            _save_checkpoint(out_dir, backend, optimizer, scheduler, run_trainable, state, accelerator)
        if stopping:
            break
    bar.close()
    backend.teardown(model)
    if dataset.skips.counts and accelerator.is_main_process:
        log.warning("%s: %s", desc, dataset.skips.summary())
    return {"history": state["history"], "steps": step, "seconds": round(time.time() - t_start, 2),
            "samples": step * cfg.global_batch, "skipped": dict(dataset.skips.counts),
            "backend": {k: v for k, v in state["run"].items() if k != "trainable"}}


def _micro_step(model: nn.Module, unwrapped: nn.Module, batch: dict, dataset: CaptionDataset, cfg: TrainConfig,
                device: torch.device, image_dtype: torch.dtype,
                aux_loss: AuxLoss | None) -> tuple[torch.Tensor, dict[str, float]]:
    if "image" not in batch:  # every sample of this micro-batch was unreadable: take part with no rows
        size = unwrapped.visual.image_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        batch.update(image=torch.zeros(0, 3, *size), text=torch.zeros(0, unwrapped.context_length, dtype=torch.long))
    # images in the model's dtype: a bf16 DeepSpeed engine casts the weights, not the inputs
    image_f, text_f, scale = model(batch["image"].to(device, dtype=image_dtype), batch["text"].to(device))[:3]
    idx = batch["index"]
    cid = gather_ids(dataset.caption_ids[idx].to(device))
    iid = gather_ids(dataset.image_ids[idx].to(device))
    scale = cfg.fixed_logit_scale if cfg.fixed_logit_scale is not None else scale.reshape(())
    image_all, text_all = gather_with_grad(image_f), gather_with_grad(text_f)
    if image_all.shape[0] == 0:
        loss = (image_f.sum() + text_f.sum()) * 0.0
    else:
        loss = clip_loss(image_all, text_all, scale, positive_mask(cid, iid), cfg.label_smoothing)
    metrics = {"clip_loss": float(loss.detach())}
    if aux_loss is not None:
        extra, m = aux_loss(unwrapped)
        loss = loss + extra
        metrics.update(m)
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def latest_checkpoint(out_dir: Path) -> Path | None:
    root = Path(out_dir) / "ckpt"
    done = sorted(p for p in root.glob("step_*") if (p / "state.json").exists()) if root.exists() else []
    return done[-1] if done else None


def _save_checkpoint(out_dir: Path, backend: Any, optimizer, scheduler, trainable: list[str],
                     state: dict, accelerator: Accelerator) -> None:
    """All ranks write into a temporary folder; the main process marks it done and renames it."""
    root = out_dir / "ckpt"
    final = root / f"step_{state['step']:07d}"
    tmp = root / f".tmp_step_{state['step']:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    backend.save(tmp, optimizer, scheduler, trainable)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        io.write_json(tmp / "state.json", state)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(root.glob("step_*"))[:-1]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
