"""Rank 1 raises mid-run while rank 0 waits in a collective: the launcher must end both, non-zero."""
import sys
import time

import torch
import torch.distributed as dist

from moeclip.pipeline.common import run_guarded
from moeclip.train.dist import make_accelerator


def main() -> None:
    accelerator = make_accelerator()
    assert accelerator.num_processes == 2
    t = torch.ones(1)
    dist.all_reduce(t)  # both ranks are up
    if accelerator.process_index == 1:
        time.sleep(0.5)
        print(f"FAILING_AT {time.time()}", flush=True)
        raise RuntimeError("rank 1 failed on purpose")
    dist.barrier()      # rank 0 would wait here for ever without the failure handling
    print("rank 0 passed the barrier", flush=True)


if __name__ == "__main__":
    run_guarded(main)
    sys.exit(0)
