"""`moeclip experts`: argument parsing and printing only; the work is in `moeclip.analysis`."""
from __future__ import annotations

import argparse


def cmd_experts(args: argparse.Namespace) -> None:
    from moeclip import load
    from moeclip.analysis import analyse_experts, write_expert_report
    from moeclip.runtime import Runtime
    runtime = Runtime.local(args.device, args.precision)
    model, preprocess, tokenizer = load(args.model, pretrained=args.pretrained, device=runtime.device)
    result = analyse_experts(model, preprocess, tokenizer, args.data, group_by=args.group_by,
                             max_rows=args.max_rows, batch_size=args.batch_size, runtime=runtime,
                             split=args.split, image_root=args.image_root)
    result["model"] = str(args.model)
    written = write_expert_report(result, args.out)
    for layer in result["layers"]:
        mi = ""
        if "groups" in layer:
            g = layer["groups"]
            mi = f"  MI {g['mi_bits']:.4f} bits (norm {g['mi_norm']:.3f}, chance {g['mi_null_bits']:.4f})"
        print(f"{layer['tower']:>6} block {layer['block']}: load {' / '.join(f'{x:.2f}' for x in layer['load'])}"
              f"  entropy {layer['entropy_bits']:.3f} bits  CV {layer['load_cv']:.3f}{mi}")
    print(f"wrote {', '.join(p.name for p in written.values())} to {args.out}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    x = sub.add_parser("experts", help="expert usage of an MoE model on a captioned table (JSON, heatmaps, markdown)")
    x.add_argument("--model", required=True, help="moeclip MoE model directory")
    x.add_argument("--pretrained", default=None)
    x.add_argument("--data", required=True, help="CSV/TSV with filepath,title columns (or a Karpathy or "
                   "ShareGPT4V caption .json)")
    x.add_argument("--image-root", default=None, help="folder the data's relative image paths start from "
                   "(default: the data file's folder)")
    x.add_argument("--split", default="test", help="Karpathy split (.json data only; default test)")
    x.add_argument("--group-by", default=None,
                   help="column to break usage down by (a class, a factor such as colour, a cluster label)")
    x.add_argument("--max-rows", type=int, default=2048, help="analyse the first N rows (default 2048)")
    x.add_argument("--batch-size", type=int, default=64)
    x.add_argument("--out", required=True, help="output folder")
    x.add_argument("--device", default=None, help="default: the first GPU, else the CPU")
    x.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"], help="autocast dtype (default: none)")
    x.set_defaults(func=cmd_experts)
