"""CLIP-MoE against its dense base: encode throughput (images/s, texts/s) and the FLOP-bound.

Random weights (speed does not depend on them; no download). The MoE model is the dense one upcycled
with 4 experts, top-2, in every block of both towers (`moeclip.upcycle`, router std 0.02). FLOPs are
counted with `torch.utils.flop_counter.FlopCounterMode` on one forward with autograd on: in inference
mode `nn.MultiheadAttention` takes a fused fast path the counter does not see, and would drop the
attention FLOPs. The FLOP-bound throughput of the MoE = dense throughput x dense FLOPs / MoE FLOPs:
what the MoE would reach if every FLOP ran as fast as the dense model's. Text batches hold captions
of 5-20 tokens padded to the context length (open_clip computes the padding positions too).

    python bench/clip_throughput.py [--quick] --out results.json
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timer, loadavg, one_thread, round_robin, write_json  # noqa: E402

import torch  # noqa: E402

import moeclip  # noqa: E402
from moeclip.model.factory import build_dense  # noqa: E402


def models(arch: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    dense = build_dense(arch).eval()
    moe = moeclip.upcycle(copy.deepcopy(dense), None, num_experts=4, top_k=2, router_init_std=0.02).eval()
    return dense, moe


def inputs(model: torch.nn.Module, images: int, texts: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    img = torch.randn(images, 3, size, size, generator=g)
    ctx = model.context_length
    txt = torch.randint(1, 1000, (texts, ctx), generator=g)
    for row in range(texts):
        txt[row, min(ctx, 5 + row % 16):] = 0
    return img, txt


def count_flops(model: torch.nn.Module, fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        fn(model)
    return counter.get_total_flops()


MODES = ("fp32", "bf16 autocast", "bf16 weights")


def bench_arch(arch: str, batch_img: int, batch_txt: int, repeats: int, modes: dict[str, tuple[str, ...]]) -> list[dict]:
    """modes: {"image": (...), "text": (...)} precision modes to run: fp32, bf16 autocast (fp32 weights,
    `torch.autocast`), bf16 weights (the model cast to bfloat16, the usual way to serve in bf16)."""
    dense, moe = models(arch)
    img, txt = inputs(dense, batch_img, batch_txt)
    low = {}
    if any("bf16 weights" in m for m in modes.values()):
        low = {"dense": copy.deepcopy(dense).to(torch.bfloat16), "moe": copy.deepcopy(moe).to(torch.bfloat16)}
    rows = []
    for kind, n in (("image", batch_img), ("text", batch_txt)):
        def fn(m, bf16=False, kind=kind):
            if kind == "image":
                return m.encode_image(img.to(torch.bfloat16) if bf16 else img)
            return m.encode_text(txt)
        flops = {"dense": count_flops(dense, fn), "moe": count_flops(moe, fn)}
        for mode in modes.get(kind, ()):
            pair = low if mode == "bf16 weights" else {"dense": dense, "moe": moe}

            def step(model, mode=mode):
                def run() -> dict:
                    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16 autocast" else contextlib.nullcontext()
                    with torch.inference_mode(), ctx, Timer() as t:
                        fn(model, bf16=mode == "bf16 weights")
                    return {"total": t.cpu, "total_wall": t.wall}
                return run
            times = round_robin(OrderedDict([("dense", step(pair["dense"])), ("moe", step(pair["moe"]))]), repeats, 1)
            flop_ratio = flops["moe"] / flops["dense"]
            dense_rate = n / min(t["total"] for t in times["dense"])
            moe_rate = n / min(t["total"] for t in times["moe"])
            of_bound = moe_rate / (dense_rate / flop_ratio)  # best round over best round
            paired = statistics.median(d["total"] / m["total"] * flop_ratio for d, m in zip(times["dense"], times["moe"]))
            row = {"arch": arch, "kind": kind, "mode": mode, "autocast_bf16": mode == "bf16 autocast", "batch": n,
                   "dense_per_s": dense_rate, "moe_per_s": moe_rate, "flops_dense": flops["dense"] / n,
                   "flops_moe": flops["moe"] / n, "flop_ratio": flop_ratio, "bound_per_s": dense_rate / flop_ratio,
                   "moe_of_bound": of_bound, "moe_of_bound_paired": paired, "repeats": repeats}
            print(row, flush=True)
            rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    one_thread()
    result = {"load_before": loadavg(), "threads": torch.get_num_threads()}
    tiny_modes = MODES[:2] if args.quick else MODES
    rows = bench_arch("moeclip-tiny", 256, 256, 7 if args.quick else 9, {"image": tiny_modes, "text": tiny_modes})
    if not args.quick:  # ~2 minutes here; quick mode keeps to the tiny model. Autocast is slow for ViT-B-32 on
        # this CPU (docs/benchmarks.md, 3): image only, 2 rounds
        rows += bench_arch("ViT-B-32", 16, 16, 3, {"image": ("fp32", "bf16 weights"), "text": ("fp32", "bf16 weights")})
        rows += bench_arch("ViT-B-32", 16, 16, 2, {"image": ("bf16 autocast",)})
    result.update(rows=rows, load_after=loadavg())
    write_json(args.out, result)


if __name__ == "__main__":
    main()
