"""Shared pieces of the benchmark suite (`python bench/run.py`): machine facts, timing, routing set-up.

Timing on a shared machine. The 2 cores here are shared with training jobs, so:
- every timed process uses ONE torch thread (a second thread waits on a preempted sibling and
  makes times swing by 2x), and times are process CPU time (`time.process_time`), which does
  not advance while the process is descheduled; wall time is recorded too;
- variants are timed round-robin, one round of each in turn, with the order rotated per round, and
  a ratio is best round over best round (a burst of load in one round cannot move it, as long as
  every variant gets one clean round); the median of same-round ratios is kept as a cross-check.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------------------------- machine

def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    facts = {}
    for line in out.splitlines():
        key, _, value = line.partition(":")
        facts[key.strip()] = value.strip()
    return facts


def machine_facts() -> dict[str, Any]:
    """What a training report records as its `environment` (moeclip.pipeline.common: torch, python, threads,
    CPU model and instruction set, moeclip version, commit), plus what only a benchmark needs: the core layout,
    caches, memory, CPU flags and more library versions."""
    import torch
    from moeclip.pipeline.common import environment
    from moeclip.runtime import Runtime

    env = environment(Runtime.local("cpu"))
    cpu = _lscpu()
    try:
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        nproc = os.cpu_count()
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    flags = cpu.get("Flags", "").split()
    from importlib.metadata import PackageNotFoundError, version

    versions = {"torch": env["torch"], "python": env["python"]}
    for key, dist in (("deepspeed", "deepspeed"), ("sklearn", "scikit-learn"), ("open_clip", "open_clip_torch"),
                      ("numpy", "numpy")):
        try:
            versions[key] = version(dist)  # without importing (deepspeed and open_clip take seconds)
        except PackageNotFoundError:
            pass
    return {
        "environment": env,
        "nproc": nproc, "cpu_model": env.get("cpu") or cpu.get("Model name", platform.processor()),
        "cores_per_socket": cpu.get("Core(s) per socket"), "threads_per_core": cpu.get("Thread(s) per core"),
        "l2": cpu.get("L2 cache"), "l3": cpu.get("L3 cache"), "hypervisor": cpu.get("Hypervisor vendor"),
        "isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags],
        "mem_gb": mem_gb, "versions": versions, "torch_threads_default": env["threads"],
        "torch_config": torch.__config__.parallel_info().splitlines()[0:3],
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def peak_rss_mb() -> float:
    """High-water resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_thread() -> None:
    import torch

    torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------- timing

class Timer:
    """CPU and wall time of one call."""

    def __init__(self) -> None:
        self.cpu = self.wall = 0.0

    def __enter__(self) -> "Timer":
        self._c, self._w = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cpu, self.wall = time.process_time() - self._c, time.perf_counter() - self._w


def fwd_bwd_step(forward: Callable[[], Any], grad: Any = None, backward: bool = True,
                 after: Callable[[], None] | None = None) -> dict[str, float]:
    """Time forward, then backward with a fixed upstream gradient; returns fwd and fwd+bwd (CPU and wall)."""
    with Timer() as tf:
        y = forward()
    tb = Timer()
    if backward:
        with tb:
            y.backward(grad)
    if after is not None:
        after()
    return {"fwd": tf.cpu, "fwd_wall": tf.wall, "total": tf.cpu + tb.cpu, "total_wall": tf.wall + tb.wall}


def round_robin(steps: "OrderedDict[str, Callable[[], dict[str, float]]]", repeats: int,
                warmup: int = 1) -> dict[str, list[dict[str, float]]]:
    """Each repeat runs every variant once; the order rotates so no variant always runs first."""
    names = list(steps)
    out: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t = steps[name]()
            if r >= warmup:
                out[name].append(t)
    return out


def paired_ratio(times: dict[str, list[dict[str, float]]], num: str, den: str, key: str = "total",
                 den_scale: float = 1.0) -> float:
    """Median over repeats of num_i / (den_scale * den_i): both measured in the same round."""
    return statistics.median(a[key] / (den_scale * b[key]) for a, b in zip(times[num], times[den]))


def best(times: list[dict[str, float]], key: str = "total") -> float:
    return min(t[key] for t in times)


# ----------------------------------------------------------------------------------------------- layers

def dense_mlp(d_model: int, hidden: int):
    """open_clip's block MLP layout (c_fc -> GELU -> c_proj)."""
    from torch import nn

    return nn.Sequential(OrderedDict([("c_fc", nn.Linear(d_model, hidden)), ("gelu", nn.GELU()),
                                      ("c_proj", nn.Linear(hidden, d_model))]))


def perturbed_moe(tokens: int, d: int, experts: int, top_k: int, profile: list[float], seed: int = 0):
    """A dense FFN, its MoE with experts = perturbed copies (as after DMU), and tokens x whose routing
    through that MoE hits `profile`: the one set-up the layer and expert-parallel benchmarks share."""
    import torch

    from moeclip.moe import MoEFFN

    torch.manual_seed(seed)
    mlp = dense_mlp(d, 4 * d)
    moe = MoEFFN.from_dense(mlp, experts, top_k)
    with torch.no_grad():
        for expert in moe.experts:
            for p in expert.parameters():
                p.add_(0.01 * torch.randn_like(p))
    x, w, _ = routed_tokens(tokens, d, experts, top_k, profile, seed)
    with torch.no_grad():
        moe.router.proj.weight.copy_(w)
    return mlp, moe, x


# The trained DMU model's routing (runs/dmu/model, 256 val images + captions, measured 2026-11-22):
# per-layer expert loads sorted high to low, averaged over its 8 MoE layers, and its most skewed layer.
# bench/moe_layer.py re-measures them when that model exists.
def mean_std(values: list[float], signed: bool = False) -> str:
    """A table cell: "mean ± sample std" over seeds, the value alone for one seed, "–" for none."""
    fmt = "{:+.1f}" if signed else "{:.1f}"
    if not values:
        return "–"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {statistics.stdev(values):.1f}"


RECORDED_PROFILES = {"dmu-mean": [0.395, 0.246, 0.212, 0.147], "dmu-worst": [0.479, 0.217, 0.186, 0.118]}


def profile_for(name: str, num_experts: int, profiles: dict[str, list[float]] | None = None) -> list[float]:
    """Target fraction of routed (token, slot) pairs per expert. A 4-expert profile is stretched to E
    experts by splitting every share evenly (same max-load x E imbalance factor)."""
    if name == "balanced":
        return [1.0 / num_experts] * num_experts
    base = (profiles or RECORDED_PROFILES)[name]
    if num_experts % len(base):
        raise ValueError(f"cannot stretch a {len(base)}-expert profile to {num_experts} experts")
    rep = num_experts // len(base)
    return [p / rep for p in base for _ in range(rep)]


def routed_tokens(num_tokens: int, d_model: int, num_experts: int, top_k: int, profile: list[float],
                  seed: int = 0):
    """Tokens x [T, d] and a router weight [E, d] whose top-k routing of x hits `profile`.

    Tokens are N(0, 1) with one constant feature (like a LayerNorm bias); the router is random
    (std 0.02, as `router_init_std=0.02`) plus a per-expert weight on that feature, fitted so the
    fraction of (token, slot) pairs per expert matches the profile within half a percent.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, d_model, generator=g)
    x[:, 0] = 1.0
    w = 0.02 * torch.randn(num_experts, d_model, generator=g)
    target = torch.tensor(profile, dtype=torch.float64)
    bias = torch.zeros(num_experts, dtype=torch.float64)
    base_logits = (x[:, 1:] @ w[:, 1:].T).double()
    load = target
    for _ in range(300):
        chosen = (base_logits + bias).topk(top_k, dim=-1).indices
        load = torch.bincount(chosen.reshape(-1), minlength=num_experts).double() / chosen.numel()
        if (load - target).abs().max() < 0.005:
            break
        bias += 0.5 * (target.log() - load.clamp_min(1e-4).log())
    w[:, 0] = bias.float()
    return x, w, load.tolist()


# ----------------------------------------------------------------------------------------------- I/O

def write_json(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def python() -> str:
    return sys.executable
