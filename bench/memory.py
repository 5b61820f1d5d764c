"""Peak memory: each case in a fresh process, peak RSS (`resource.getrusage` maxrss) after set-up and after
the workload; the difference is what the workload itself adds at its peak (activations, gradients,
dispatch buffers). tracemalloc does not see torch's allocations, hence processes.

Layer cases: one fwd+bwd at 4,096 tokens, d 512, 4 experts of 2,048, top-2, balanced routing (the dense
FFN: one FFN on the same tokens). CLIP cases: one inference encode of a batch of images.
(k-means and expert-parallel peaks are recorded by their own sections, which also run in fresh processes.)

    python bench/memory.py [--quick] --out results.json
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, loadavg, peak_rss_mb, read_json, write_json  # noqa: E402

LAYER = {"T": 4096, "d": 512, "E": 4, "k": 2}
CASES = {
    "layer fp32: dense FFN": ("layer", "fp32", "floor"),
    "layer fp32: moeclip MoEFFN": ("layer", "fp32", "moeclip"),
    "layer fp32: loop dispatch": ("layer", "fp32", "loop"),
    "layer fp32: DeepSpeed dropless": ("layer", "fp32", "deepspeed"),
    "layer bf16: dense FFN": ("layer", "bf16", "floor"),
    "layer bf16: moeclip MoEFFN": ("layer", "bf16", "moeclip"),
    "layer bf16: DeepSpeed dropless": ("layer", "bf16", "deepspeed"),
    "encode 256 images: moeclip-tiny dense": ("clip", "moeclip-tiny", "dense", 256),
    "encode 256 images: moeclip-tiny MoE": ("clip", "moeclip-tiny", "moe", 256),
    "encode 16 images: ViT-B-32 dense": ("clip", "ViT-B-32", "dense", 16),
    "encode 16 images: ViT-B-32 MoE": ("clip", "ViT-B-32", "moe", 16),
}
QUICK = ["layer bf16: moeclip MoEFFN", "layer bf16: DeepSpeed dropless"]


def run_case(name: str) -> dict:
    import torch

    torch.set_num_threads(1)
    spec = CASES[name]
    if spec[0] == "layer":
        _, dtype, variant = spec
        from moe_layer import build_case, case_steps, init_single_process_group
        from common import profile_for

        if variant == "deepspeed":
            init_single_process_group()
        case = build_case(LAYER["T"], LAYER["d"], LAYER["E"], LAYER["k"], dtype, profile_for("balanced", LAYER["E"]),
                          with_deepspeed=variant == "deepspeed")
        step = case_steps(case, [variant])[variant]
        setup = peak_rss_mb()
        step()
    else:
        _, arch, kind, batch = spec
        import moeclip
        from clip_throughput import inputs
        from moeclip.model.factory import build_dense

        torch.manual_seed(0)
        model = build_dense(arch).eval()
        if kind == "moe":  # only the model being measured is ever built
            model = moeclip.upcycle(model, None, num_experts=4, top_k=2, router_init_std=0.02).eval()
        img, _ = inputs(model, batch, 1)
        setup = peak_rss_mb()
        with torch.inference_mode():
            model.encode_image(img)
    peak = peak_rss_mb()
    return {"case": name, "setup_rss_mb": setup, "peak_rss_mb": peak, "workload_mb": peak - setup}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.case:
        write_json(args.out, run_case(args.case))
        return
    rows = []
    out = Path(args.out)
    for name in (QUICK if args.quick else list(CASES)):
        tmp = out.with_suffix(".case.json")
        subprocess.run([sys.executable, __file__, "--case", name, "--out", str(tmp)], check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL)
        row = read_json(tmp)
        tmp.unlink()
        print(row, flush=True)
        rows.append(row)
    write_json(out, {"rows": rows, "layer": LAYER, "load": loadavg()})


if __name__ == "__main__":
    main()
