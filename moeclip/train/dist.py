"""Process-group set-up and teardown that works the same on CPU (gloo) and GPU (nccl).

accelerate leaves the backend unset without a GPU and then reports one process; gloo processes
sometimes abort at interpreter exit. Both are handled here so recipes never see them.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs


def make_accelerator(**kwargs: Any) -> Accelerator:
    handlers = list(kwargs.pop("kwargs_handlers", []))
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(kwargs_handlers=handlers, **kwargs)


def finish(code: int = 0) -> None:
    """barrier -> destroy_process_group -> flush -> os._exit: a launched job never dies at exit."""
    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    try:
        if multi and code == 0:
            dist.barrier()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if multi:
            os._exit(code)
    if code:
        sys.exit(code)
