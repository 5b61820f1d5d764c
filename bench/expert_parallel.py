"""Expert-parallel overhead: one MoE layer over 2 processes (torchrun, gloo), EP=2 against EP=1, same global work.

Every rank holds the same layer and takes its half of the same global tokens. Variants, fwd+bwd:
- EP=1, moeclip: `MoEFFN` with every expert on every rank (data parallel; no communication in the layer);
- EP=1, DeepSpeed: moeclip's `MoEFFN` on the expert-parallel backend with ep_size=1 (DeepSpeed's layer, no all-to-all);
- EP=2, DeepSpeed: the same with ep_size=2: each rank holds 2 of the 4 experts, tokens go
  to their expert's rank and back by all-to-all (2 in the forward, 2 in the backward).
A step's time is the slower rank's wall time (a barrier before each step). The all-to-all is also
timed alone at the size the layer sends.

    python bench/expert_parallel.py [--quick] --out results.json     # launches torchrun itself
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import statistics
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, loadavg, peak_rss_mb, profile_for, read_json, write_json  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.moe.sharded_moe import _AllToAll
    from deepspeed.utils import logger as ds_logger

    from common import perturbed_moe
    from moeclip.distributed.expert_parallel import make_expert_parallel
    from moeclip.train.dist import finish

    ds_logger.setLevel(logging.ERROR)
    with contextlib.redirect_stdout(sys.stderr):
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    configs = [(2048, 512, "balanced")] if args.quick else [
        (4096, 512, "balanced"), (4096, 512, "dmu-mean"), (16384, 512, "balanced"), (4096, 768, "balanced")]
    profiles = read_json(args.profiles) if args.profiles else None
    rows = []
    for tokens, d, prof_name in configs:
        experts, top_k = 4, 2
        _, layer, x_all = perturbed_moe(tokens, d, experts, top_k, profile_for(prof_name, experts, profiles), 0)
        per_rank = tokens // world
        x = x_all[rank * per_rank:(rank + 1) * per_rank].clone().requires_grad_()
        grad = torch.randn(per_rank, d, generator=torch.Generator().manual_seed(1 + rank))
        with contextlib.redirect_stdout(sys.stderr):
            ep1 = make_expert_parallel(copy.deepcopy(layer), 1)
            ep2 = make_expert_parallel(copy.deepcopy(layer), 2)
        variants = OrderedDict([("EP=1 moeclip MoEFFN", layer), ("EP=1 DeepSpeed", ep1), ("EP=2 DeepSpeed", ep2)])

        with torch.no_grad():
            ref = layer(x.detach())
            diff = float((ep2(x.detach()) - ref).abs().max() / ref.abs().max())
            counts = torch.bincount(layer.last_routing.experts.reshape(-1), minlength=experts)
            capacity = counts.max().clone()
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX)
            rank_rows = counts.view(world, -1).sum(1).float()  # rows each rank's experts get from this rank
            dist.all_reduce(rank_rows)
        times: dict[str, list[float]] = {n: [] for n in variants}
        cpu: dict[str, list[float]] = {n: [] for n in variants}
        repeats = 2 if args.quick else 3
        names = list(variants)
        for r in range(1 + repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                module = variants[name]
                dist.barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                module(x).backward(grad)
                elapsed = torch.tensor([time.perf_counter() - t0, time.process_time() - c0], dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                x.grad = None
                module.zero_grad(set_to_none=True)
                if r:
                    times[name].append(float(elapsed[0]))
                    cpu[name].append(float(elapsed[1]))
        # the all-to-all alone, at the size EP=2 sends: [experts, capacity, d] fp32, 4 per fwd+bwd
        buf = torch.randn(experts, int(capacity), d)
        group = ep2.ep_group
        a2a = []
        for r in range(1 + repeats):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(4):
                _AllToAll.apply(group, buf)
            elapsed = torch.tensor(time.perf_counter() - t0, dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if r:
                a2a.append(float(elapsed))
        rss = torch.tensor([peak_rss_mb()], dtype=torch.float64)
        gathered = [torch.zeros_like(rss) for _ in range(world)]
        dist.all_gather(gathered, rss)
        row = {"tokens": tokens, "d": d, "E": experts, "k": top_k, "profile": prof_name, "dtype": "fp32",
               "ep2_rel_diff": diff, "capacity": int(capacity),
               "ep2_rank_share": [round(float(v) / float(rank_rows.sum()), 3) for v in rank_rows],
               "ms": {n: min(t) * 1e3 for n, t in times.items()},
               "cpu_ms": {n: min(t) * 1e3 for n, t in cpu.items()},
               "all_to_all_x4_ms": min(a2a) * 1e3, "a2a_MB": buf.numel() * 4 / 2**20,
               "peak_rss_mb_per_rank": [round(float(g), 1) for g in gathered]}
        def paired(t: dict, a: str, b: str) -> float:  # median over rounds of a/b measured in the same round
            return statistics.median(u / v for u, v in zip(t[a], t[b]))

        ep2, ep1, mc = "EP=2 DeepSpeed", "EP=1 DeepSpeed", "EP=1 moeclip MoEFFN"
        row["ep2_over_ep1_ds"] = min(times[ep2]) / min(times[ep1])  # best round over best round
        row["ep2_over_ep1_moeclip"] = min(times[ep2]) / min(times[mc])
        row["ep2_over_ep1_ds_cpu"] = min(cpu[ep2]) / min(cpu[ep1])
        row["ep2_over_ep1_ds_paired"] = paired(times, ep2, ep1)
        row["repeats"] = repeats
        rows.append(row)
        if rank == 0:
            print(row, flush=True)
    if rank == 0:
        write_json(args.out, {"rows": rows, "world_size": world, "threads_per_rank": torch.get_num_threads()})
    finish(0)


def launch(args: argparse.Namespace) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(Path(__file__).resolve()), "--worker",
           "--out", str(Path(args.out).resolve())]
    if args.quick:
        cmd.append("--quick")
    if args.profiles:
        cmd += ["--profiles", args.profiles]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    before = loadavg()
    t0 = time.perf_counter()
    run = subprocess.run(cmd, cwd=REPO, env=env, timeout=1800)
    if run.returncode != 0:
        raise SystemExit(f"torchrun failed with exit code {run.returncode}")
    result = read_json(args.out)
    result.update(command=" ".join(cmd[0:1] + cmd[1:]), load_before=before, load_after=loadavg(),
                  launch_seconds=time.perf_counter() - t0)
    write_json(args.out, result)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--profiles", help="JSON file of routing profiles (from bench/moe_layer.py)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    worker(args) if args.worker else launch(args)


if __name__ == "__main__":
    main()
