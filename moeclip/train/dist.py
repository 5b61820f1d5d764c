"""Process-group set-up and teardown that works the same on CPU (gloo) and GPU (nccl).

accelerate leaves the backend unset without a GPU and then reports one process; gloo processes
sometimes abort at interpreter exit. Both are handled here so recipes never see them. The
launch's parallel layout that accelerate does not know about (the expert-parallel size) rides on
the accelerator, because like the process count it is a property of the launch, not of a stage.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

log = logging.getLogger(__name__)


@dataclass
class DistributedConfig:
    """`distributed:` in a recipe YAML (docs/distributed.md)."""
    ep_size: int | None = None  # DeepSpeed launches: processes that share one copy of the experts; None = max
    # torch threads per process on CPU. None = this machine's cores / local processes: `accelerate launch`
    # pins every process to OMP_NUM_THREADS (1 unless set), which leaves all other cores idle
    cpu_threads: int | None = None


def make_accelerator(distributed: DistributedConfig | None = None, **kwargs: Any) -> Accelerator:
    # torch deprecates the all_gather flavours our gathered loss and DeepSpeed call; libraries reset the
    # warning registry, so the notice would print on every step of every rank
    warnings.filterwarnings("ignore", message=r".*all_gather.*is deprecated", category=FutureWarning)
    handlers = list(kwargs.pop("kwargs_handlers", []))
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(kwargs_handlers=handlers, **kwargs)
    accelerator.moeclip_distributed = distributed or DistributedConfig()
    if accelerator.device.type == "cpu":
        threads = accelerator.moeclip_distributed.cpu_threads or cpu_threads_per_process()
        if threads != torch.get_num_threads():
            log.info("torch threads per process: %d (was %d; distributed.cpu_threads sets it)", threads,
                     torch.get_num_threads())
            torch.set_num_threads(threads)
    return accelerator


def cpu_threads_per_process() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def distributed_config(accelerator: Accelerator) -> DistributedConfig:
    return getattr(accelerator, "moeclip_distributed", None) or DistributedConfig()


def finish(code: int = 0) -> None:
    """barrier -> destroy_process_group -> flush -> os._exit: a launched job never dies at exit.

    On failure no collective is attempted (the other ranks may be gone or stuck): the process leaves at
    once with a non-zero code, and the launcher (torchrun / accelerate) takes the other ranks down.
    """
    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    try:
        if multi and code == 0:
            dist.barrier()
        if dist.is_available() and dist.is_initialized() and code == 0:
            dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if multi:
            os._exit(code)
    if code:
        sys.exit(code)
