"""Where and how the work of one launch runs: device, autocast dtype, rank, world size.

Made once per launch by the training application (`moeclip.train.dist.make_runtime`) and handed
to every step: embedding, clustering, training, upcycling, evaluation, analysis. Library code reads
the device and precision from here instead of choosing its own, so one launch never mixes devices,
and sharded work (`shard`, `gather_rows`) agrees with one-process work. Plain PyTorch: the
library never needs the trainer (accelerate) to use it; `Runtime.local()` is the one-process form.
"""
from __future__ import annotations

import contextlib
import datetime
import platform
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

DTYPES = {"no": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> torch.device:
    """The first accelerator when there is one: library entry points never silently fall back to the CPU
    on a GPU machine."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclass
class Runtime:
    device: torch.device = field(default_factory=default_device)
    autocast_dtype: torch.dtype | None = None  # None = full precision
    rank: int = 0
    world_size: int = 1
    # collectives wait this long for the slowest rank (k-means runs on rank 0 while the others wait)
    timeout: datetime.timedelta = datetime.timedelta(hours=2)
    # the training application's handle (an accelerate Accelerator); the library never touches it
    trainer: Any = None

    @classmethod
    def local(cls, device: str | torch.device | None = None, precision: str = "no") -> "Runtime":
        """One process; `device` None = the first accelerator, else the CPU; `precision` no | bf16 | fp16."""
        if precision not in DTYPES:
            raise ValueError(f"precision {precision!r}; expected one of {sorted(DTYPES)}")
        return cls(device=torch.device(device) if device is not None else default_device(),
                   autocast_dtype=DTYPES[precision])

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    @property
    def precision(self) -> str:
        return next(k for k, v in DTYPES.items() if v == self.autocast_dtype)

    def describe(self) -> dict[str, Any]:
        """What the numbers were computed on. Float results move with the processor's kernels (a CPU with AVX-512
        takes other MKL/oneDNN paths than one without), so a report that does not repeat on another day can be
        checked against the machine before anything else is suspected."""
        info: dict[str, Any] = {"device": str(self.device), "precision": self.precision,
                                "world_size": self.world_size, "torch": torch.__version__,
                                "threads": torch.get_num_threads(), "python": platform.python_version()}
        if self.device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(self.device)
        else:
            info["cpu"] = _cpu_model()
            info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        return info

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for inference passes (embedding, evaluation, analysis); a no-op in full precision."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def shard(self, n: int) -> range:
        """This rank's contiguous part of n items (the first n % world ranks take one more)."""
        per, extra = divmod(n, self.world_size)
        start = self.rank * per + min(self.rank, extra)
        return range(start, start + per + (self.rank < extra))

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's rows, in rank order, on every rank (ranks may hold different row counts).

        With `shard` this reassembles a sharded pass in the one-process order. The collective runs on
        the runtime's device (NCCL needs GPU tensors); the result comes back where `x` was."""
        if not self.distributed:
            return x
        if x.dtype == torch.bool:  # not every backend gathers bools
            return self.gather_rows(x.to(torch.uint8)).bool()
        here = x.to(self.device)
        sizes = torch.tensor([here.shape[0]], device=self.device)
        all_sizes = [torch.empty_like(sizes) for _ in range(self.world_size)]
        dist.all_gather(all_sizes, sizes)
        counts = [int(s) for s in all_sizes]
        pad = max(counts) - here.shape[0]
        if pad:
            here = torch.cat([here, here.new_zeros(pad, *here.shape[1:])])
        parts = [torch.empty_like(here) for _ in counts]
        dist.all_gather(parts, here.contiguous())
        return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(x.device)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (small, picklable: counts, skip logs), in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def _cpu_model() -> str:
    """The processor's name as Linux reports it (platform.processor() is empty there)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()
