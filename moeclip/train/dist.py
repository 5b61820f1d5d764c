"""Process-group set-up and teardown that works the same on CPU (gloo) and GPU (nccl).

accelerate leaves the backend unset without a GPU and then reports one process; gloo processes
sometimes abort at interpreter exit. Both are handled here so recipes never see them. The
launch's parallel layout that accelerate does not know about (the expert-parallel size) rides on
the accelerator, because like the process count it is a property of the launch, not of a stage.
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs


@dataclass
class DistributedConfig:
    """`distributed:` in a recipe YAML. Only read under a DeepSpeed launch (docs/distributed.md)."""
    ep_size: int | None = None  # processes that share one copy of the experts; None = as many as possible


def make_accelerator(distributed: DistributedConfig | None = None, **kwargs: Any) -> Accelerator:
    # torch deprecates the all_gather flavours our gathered loss and DeepSpeed call; libraries reset the
    # warning registry, so the notice would print on every step of every rank
    warnings.filterwarnings("ignore", message=r".*all_gather.*is deprecated", category=FutureWarning)
    handlers = list(kwargs.pop("kwargs_handlers", []))
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(kwargs_handlers=handlers, **kwargs)
    accelerator.moeclip_distributed = distributed or DistributedConfig()
    return accelerator


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
