"""Time one MoE FFN forward + backward: sorted vs loop dispatch vs the dense-FFN floor.

The floor is k dense FFNs over the same tokens (what top-k routing must compute anyway); the gap
above it is dispatch overhead. Run: python bench/moe_dispatch.py [--tokens 4096 --repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

from moeclip.moe import DISPATCHERS, MoEFFN


def dense_mlp(d_model: int, hidden: int) -> nn.Module:
    return nn.Sequential(OrderedDict([("c_fc", nn.Linear(d_model, hidden)), ("gelu", nn.GELU()),
                                      ("c_proj", nn.Linear(hidden, d_model))]))


def time_fwd_bwd(step: Callable[[], torch.Tensor]) -> float:
    start = time.perf_counter()
    step().float().square().mean().backward()
    return time.perf_counter() - start


def interleaved_times(steps: dict[str, Callable[[], torch.Tensor]], repeats: int,
                      warmup: int = 2) -> dict[str, list[float]]:
    """Round-robin over variants, so load from other processes on a shared machine hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            elapsed = time_fwd_bwd(step)
            if i >= warmup:
                times[name].append(elapsed)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)

    mlp = dense_mlp(args.d_model, args.hidden)
    moe = MoEFFN.from_dense(mlp, args.experts, args.top_k, router_init_std=0.02)
    for expert in moe.experts:  # distinct experts, as after DMU
        for p in expert.parameters():
            p.data.add_(0.01 * torch.randn_like(p))
    x = torch.randn(args.tokens, args.d_model, requires_grad=True)

    def run_moe(dispatch: str) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            moe.dispatch = dispatch
            return moe(x)
        return step

    def dense_floor() -> torch.Tensor:
        return sum(mlp(x) for _ in range(args.top_k))

    # Experts that only scale channels: what is left is the router plus the dispatch itself.
    scales = [torch.randn(args.d_model, requires_grad=True) for _ in range(args.experts)]

    def dispatch_only(name: str) -> Callable[[], torch.Tensor]:
        dispatch = DISPATCHERS[name]
        return lambda: dispatch(x, moe.router(x), lambda e, h: h * scales[e], args.experts)

    steps = {"dense floor (k x FFN)": dense_floor,
             "MoE sorted dispatch": run_moe("sorted"),
             "MoE loop dispatch": run_moe("loop"),
             "router+sorted, no FFN": dispatch_only("sorted"),
             "router+loop, no FFN": dispatch_only("loop")}
    print(f"fwd+bwd, T={args.tokens}, d={args.d_model}, h={args.hidden}, E={args.experts}, "
          f"k={args.top_k}, fp32, {torch.get_num_threads()} threads, {args.repeats} interleaved repeats")
    # min is the steadier statistic when another process shares the cores; the ratio uses it.
    print(f"{'variant':<24} {'median ms':>10} {'min ms':>8} {'min/floor':>10}")
    floor = None
    for name, times in interleaved_times(steps, args.repeats).items():
        median, best = statistics.median(times) * 1e3, min(times) * 1e3
        floor = floor or best
        print(f"{name:<24} {median:>10.1f} {best:>8.1f} {best / floor:>9.2f}x")


if __name__ == "__main__":
    main()
