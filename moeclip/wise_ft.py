"""`moeclip wise-ft`: a fine-tuned (MoE or dense) CLIP pulled back towards the base it came from, scored on the
user's data sets next to both ends, so the user sees what the interpolation keeps of each.

The interpolation is `moeclip.moe.interpolate` (WiSE-FT, Wortsman et al. 2022): no training, no old data. Pass the
new domain's and the old domain's validation sets to `--data` to read the trade-off; docs/results.md §4 measures it
in the adaptation scenario.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from moeclip.runtime import Runtime


def _data_sets(specs: list[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        if not Path(path).exists():
            raise FileNotFoundError(f"--data {spec!r}: no file {path}")
        if name in out:
            raise ValueError(f"--data: two data sets named {name!r}; name them NAME=PATH")
        out[name] = path
    return out


def wise_ft(model_dir: str | Path, base: str | Path, out: str | Path, alpha: float,
            data: dict[str, str] | None = None, runtime: Runtime | None = None) -> dict[str, Any]:
    """Writes the interpolated model to `out`; returns mean R@1 of base, model and result on each data set."""
    from moeclip import load, save_model_dir
    from moeclip.compress import retrieval
    from moeclip.moe.interpolate import interpolate_with_base
    rt = runtime or Runtime.local()
    base_model, preprocess, tokenizer = load(base, device=rt.device)
    tuned = load(model_dir, device=rt.device)[0]
    scores: dict[str, dict[str, float]] = {}
    for name, path in (data or {}).items():
        scores[name] = {"base": retrieval(base_model, preprocess, tokenizer, path, rt)["mean_R@1"],
                        "model": retrieval(tuned, preprocess, tokenizer, path, rt)["mean_R@1"]}
    mixed = interpolate_with_base(tuned, base_model, alpha)
    for name, path in (data or {}).items():
        scores[name]["wise_ft"] = retrieval(mixed, preprocess, tokenizer, path, rt)["mean_R@1"]
    report = {"alpha": alpha, "base": str(base), "mean_R@1": scores}
    save_model_dir(mixed, out, extra={"interpolated_from": str(model_dir), "wise_ft": report})
    return report


def cmd_wise_ft(args: argparse.Namespace) -> None:
    rt = Runtime.local(args.device, args.precision)
    r = wise_ft(args.model, args.base, args.out, args.alpha, _data_sets(args.data or []), rt)
    for name, s in r["mean_R@1"].items():
        print(f"{name}: mean R@1 base {100 * s['base']:.2f}, model {100 * s['model']:.2f}, "
              f"alpha {args.alpha:g} {100 * s['wise_ft']:.2f}")
    print(f"wrote {args.out}: {args.alpha:g} x model + {1 - args.alpha:g} x base")


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("wise-ft", help="interpolate a fine-tuned model's weights with its base (WiSE-FT), "
                       "scored on --data")
    p.add_argument("model", help="the fine-tuned moeclip model directory (MoE or dense)")
    p.add_argument("out", help="the model directory to write")
    p.add_argument("--base", required=True, help="the dense model it was fine-tuned from (directory or open_clip "
                   "name, as moeclip.load takes)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the fine-tuned model, 0..1 (default 0.5)")
    p.add_argument("--data", nargs="+", help="NAME=CSV (or a path) to score base, model and result on, e.g. "
                   "new=new/val.csv old=old/val.csv")
    p.add_argument("--device", default=None, help="default: the first GPU, else the CPU")
    p.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"], help="autocast dtype (default: none)")
    p.set_defaults(func=cmd_wise_ft)
