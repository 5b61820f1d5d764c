"""The launch's runtime: process group, device and precision, made once and handed to every step.

accelerate decides the layout from the launch command (`accelerate launch` / torchrun / a DeepSpeed
config); this module turns that into one `moeclip.runtime.Runtime`. What accelerate gets wrong without
a GPU is handled here, so recipes never see it: under torchrun or a multi-process launch on CPU it
leaves the process group uncoordinated (its barriers do nothing, models are not wrapped in DDP) unless
asked for CPU explicitly, and it pins every process to one thread. The collective timeout is set
explicitly, long enough for rank 0's k-means while the others wait (docs/distributed.md).
"""
from __future__ import annotations

import datetime
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

from moeclip.runtime import DTYPES, Runtime

log = logging.getLogger(__name__)


@dataclass
class DistributedConfig:
    """`distributed:` in a recipe YAML (docs/distributed.md)."""
    ep_size: int | None = None  # DeepSpeed launches: processes that share one copy of the experts; None = max
    # torch threads per process on CPU. None = this machine's cores / local processes: `accelerate launch`
    # pins every process to OMP_NUM_THREADS (1 unless set), which leaves all other cores idle
    cpu_threads: int | None = None
    # how long a collective waits for the slowest rank; the longest wait is MCL's k-means on rank 0
    # (minutes at 1M pairs, docs/benchmarks.md), so the default leaves a wide margin
    collective_timeout_s: float = 7200.0


def make_runtime(distributed: DistributedConfig | None = None, **kwargs: Any) -> Runtime:
    """One per launch. `kwargs` go to accelerate's Accelerator (tests pass e.g. mixed_precision)."""
    accelerator = make_accelerator(distributed, **kwargs)
    cfg = distributed_config(accelerator)
    return Runtime(device=accelerator.device, autocast_dtype=DTYPES[accelerator.mixed_precision],
                   rank=accelerator.process_index, world_size=accelerator.num_processes,
                   timeout=datetime.timedelta(seconds=cfg.collective_timeout_s), trainer=accelerator)


def make_accelerator(distributed: DistributedConfig | None = None, **kwargs: Any) -> Accelerator:
    # torch deprecates the all_gather flavours our gathered loss and DeepSpeed call; libraries reset the
    # warning registry, so the notice would print on every step of every rank
    warnings.filterwarnings("ignore", message=r".*all_gather.*is deprecated", category=FutureWarning)
    distributed = distributed or DistributedConfig()
    timeout = datetime.timedelta(seconds=distributed.collective_timeout_s)
    handlers = list(kwargs.pop("kwargs_handlers", []))
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if not torch.cuda.is_available() and multi and deepspeed:
        handlers.append(InitProcessGroupKwargs(backend="gloo", timeout=timeout))
    else:
        handlers.append(InitProcessGroupKwargs(timeout=timeout))
    if not torch.cuda.is_available() and multi and not deepspeed:
        kwargs.setdefault("cpu", True)  # else accelerate reports DistributedType.NO: no barrier, no DDP
    accelerator = Accelerator(kwargs_handlers=handlers, **kwargs)
    accelerator.moeclip_distributed = distributed
    if accelerator.device.type == "cpu":
        threads = distributed.cpu_threads or cpu_threads_per_process()
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
