"""What bf16 costs in accuracy: MoE layer outputs and gradients, and retrieval of a CLIP-MoE, against fp32.

Layer: one `MoEFFN` (d 512, 4 experts of 2,048, top-2, experts perturbed copies, routing skewed like the
trained DMU model) on 4,096 tokens, in fp32, under bf16 autocast (fp32 weights: the mixed-precision
training path), and with bf16 weights (DeepSpeed's bf16 mode); the dense FFN under autocast gives the
scale of plain bf16 rounding. Model: `moeclip.eval.evaluate.evaluate` (R@1, per-factor probe) of the
trained DMU model (runs/dmu/model; else checkpoints/base-tiny upcycled with 4 perturbed experts, top-2)
and of its dense base, in fp32 and under autocast, on the synthetic val split. Autocast runs on
whatever device is there (`cuda` when available, else `cpu`); nothing in moeclip names a device.

    python bench/bf16_accuracy.py [--quick] --out results.json
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RECORDED_PROFILES, Timer, dense_mlp, loadavg, one_thread, profile_for, routed_tokens, write_json  # noqa: E402,E501

import torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = (out.float() - ref).abs()
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "rel_rms": float(diff.square().mean().sqrt() / ref.square().mean().sqrt()),
            "ref_rms": float(ref.square().mean().sqrt())}


def layer_errors(profiles: dict) -> list[dict]:
    from moeclip.moe import MoEFFN

    torch.manual_seed(0)
    d, e, k, t = 512, 4, 2, 4096
    mlp = dense_mlp(d, 4 * d)
    moe = MoEFFN.from_dense(mlp, e, k)
    with torch.no_grad():
        for expert in moe.experts:  # ~5% apart, like the DMU experts (runs/dmu/mcl: distance 0.03-0.08)
            for p in expert.parameters():
                p.add_(0.05 * p.std() * torch.randn_like(p))
    x, w, _ = routed_tokens(t, d, e, k, profile_for("dmu-mean", e, profiles), 0)
    with torch.no_grad():
        moe.router.proj.weight.copy_(w)
    moe, mlp = moe.to(DEVICE), mlp.to(DEVICE)
    x = x.to(DEVICE)
    g = torch.randn(t, d, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def run(module, inp, ctx):
        module.zero_grad(set_to_none=True)
        xi = inp.clone().requires_grad_()
        with ctx:
            y = module(xi)
        y.float().backward(g)
        grad_w = (module.experts[1].c_fc.weight.grad if hasattr(module, "experts") else module.c_fc.weight.grad)
        routing = getattr(module, "last_routing", None)
        return y.detach(), xi.grad.detach(), grad_w.detach().float(), routing

    rows = []
    for name, module in (("MoE layer", moe), ("dense FFN", mlp)):
        ref_y, ref_gx, ref_gw, ref_r = run(module, x, contextlib.nullcontext())
        variants = {"autocast bf16": (module, x, torch.autocast(DEVICE, dtype=torch.bfloat16))}
        if name == "MoE layer":
            variants["bf16 weights"] = (copy.deepcopy(module).to(torch.bfloat16), x.to(torch.bfloat16),
                                        contextlib.nullcontext())
        for vname, (m, inp, ctx) in variants.items():
            y, gx, gw, r = run(m, inp, ctx)
            row = {"module": name, "mode": vname, "out_dtype": str(y.dtype).replace("torch.", ""),
                   "output": errors(y, ref_y), "input_grad": errors(gx, ref_gx), "expert_weight_grad": errors(gw, ref_gw)}
            if r is not None:
                same = (r.experts.sort(-1).values == ref_r.experts.sort(-1).values).all(-1)
                row["same_experts"] = float(same.float().mean())
            rows.append(row)
            print(row, flush=True)
    return rows


def val_subset(rows: int | None, tmp: Path) -> Path:
    table = next(p for p in (REPO / "data" / "synth" / "val.csv", REPO / "runs" / "smoke-data" / "val.csv")
                 if p.exists())
    with open(table, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames
        data = list(reader)
    data = data[:rows] if rows else data
    out = tmp / "val.csv"
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in data:
            r["filepath"] = str((table.parent / r["filepath"]).resolve())
            writer.writerow(r)
    if (table.parent / "factors.json").exists():
        shutil.copy(table.parent / "factors.json", tmp / "factors.json")
    return out


def retrieval(rows: int | None) -> dict:
    import moeclip
    from moeclip.eval.evaluate import evaluate

    model_dir = REPO / "runs" / "dmu" / "model"
    base_dir = REPO / "checkpoints" / "base-tiny"
    base, preprocess, tokenizer = moeclip.load(str(base_dir))
    if (model_dir / "model.safetensors").exists():
        moe, _, _ = moeclip.load(str(model_dir))
        moe_name = "DMU model (runs/dmu/model)"
    else:
        torch.manual_seed(0)
        moe = moeclip.upcycle(copy.deepcopy(base), None, num_experts=4, top_k=2, router_init_std=0.02)
        with torch.no_grad():
            for name, p in moe.named_parameters():
                if ".experts." in name and ".experts.0." not in name:  # expert 0 stays the base FFN
                    p.add_(0.05 * p.std() * torch.randn_like(p))
        moe_name = "base-tiny upcycled, 4 perturbed experts, top-2"
    out = {"models": {}}
    from moeclip.data.dataset import CaptionDataset
    from moeclip.runtime import Runtime

    with tempfile.TemporaryDirectory() as tmp:
        table = val_subset(rows, Path(tmp))
        ds = CaptionDataset(table, preprocess)
        first = ds[0]
        get = (lambda i: ds[i]["image"]) if isinstance(first, dict) else (lambda i: ds[i][0])
        n = min(256, len(ds.rows))
        imgs = torch.stack([get(i) for i in range(n)]).to(DEVICE)
        toks = tokenizer(ds.captions[:n]).to(DEVICE)
        for label, model in (("base (dense, checkpoints/base-tiny)", base), (moe_name, moe)):
            model = model.to(DEVICE).eval()
            res = {}
            feats = {}
            for mode in ("fp32", "autocast bf16"):
                ctx = torch.autocast(DEVICE, dtype=torch.bfloat16) if mode != "fp32" else contextlib.nullcontext()
                with ctx, Timer() as t:
                    m = evaluate(model, preprocess, tokenizer, table, batch_size=256, progress=False,
                                 runtime=Runtime.local(DEVICE, "bf16" if mode != "fp32" else "no"))
                res[mode] = {"mean_R@1": m["mean_R@1"], "image_to_text_R@1": m["image_to_text_R@1"],
                             "text_to_image_R@1": m["text_to_image_R@1"], "factors": m.get("factors", {}),
                             "seconds": t.wall, "num_rows": m["num_rows"]}
                with torch.no_grad(), ctx:  # feature agreement on the first 256 images and captions
                    feats[mode] = (model.encode_image(imgs, normalize=True).float(),
                                   model.encode_text(toks, normalize=True).float())
            cos = [float((a * b).sum(-1).min()) for a, b in zip(feats["fp32"], feats["autocast bf16"])]
            res["min_cosine_fp32_vs_autocast"] = {"image": cos[0], "text": cos[1]}
            out["models"][label] = res
            print(label, res, flush=True)
        out["table"] = f"{'first ' + str(rows) + ' rows of ' if rows else ''}" + (
            "data/synth/val.csv" if (REPO / "data/synth/val.csv").exists() else "runs/smoke-data/val.csv")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--profiles", help="JSON file of routing profiles (from bench/moe_layer.py)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    one_thread()
    from common import read_json
    profiles = read_json(args.profiles) if args.profiles else RECORDED_PROFILES
    result = {"load_before": loadavg(), "device": DEVICE}
    result["layer"] = layer_errors(profiles)
    result["retrieval"] = retrieval(300 if args.quick else None)
    result["load_after"] = loadavg()
    write_json(args.out, result)


if __name__ == "__main__":
    main()
