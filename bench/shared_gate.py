"""How much a shared expert's fusion gate gives the shared (base) FFN, per MoE block, on one or more data sets.

docs/results.md §4 asks whether a frozen base FFN beside trained experts fails to keep the old domain because
the gate shuts it out. The gate is `sigmoid(fusion(x))` per token (moeclip.moe.layer.MoEFFN): 1 = all shared.

    python bench/shared_gate.py --model runs/con/adapt_drop_frozen_shared_s0/model \
        --data new=data/synth_muted/val.csv old=data/synth/val.csv [--rows 256]
"""
import argparse

import torch

import moeclip
from moeclip.data.formats import open_dataset
from moeclip.moe.layer import MoEFFN


def gate_means(model: torch.nn.Module, preprocess, tokenizer, data: str, rows: int) -> dict[str, float]:
    """Mean gate per MoE block over the first `rows` images and captions of `data`."""
    sums: dict[str, list[float]] = {}

    def hook(name: str):
        def record(layer: MoEFFN, inputs: tuple, _out: torch.Tensor) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            sums.setdefault(name, []).append(float(torch.sigmoid(layer.fusion(x).float()).mean()))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, MoEFFN) and m.fusion is not None]
    if not handles:
        raise SystemExit("this model has no shared expert (upcycle.shared_expert=true makes one)")
    ds = open_dataset(data, preprocess)
    items = [ds[i] for i in range(min(rows, len(ds)))]
    images = torch.stack([it["image"] for it in items if it["ok"]])
    with torch.no_grad():
        model.encode_image(images)
        model.encode_text(tokenizer([it["caption"] for it in items]))
    for h in handles:
        h.remove()
    return {name: sum(v) / len(v) for name, v in sums.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", nargs="+", required=True, help="NAME=PATH, one per data set")
    ap.add_argument("--rows", type=int, default=256)
    args = ap.parse_args()
    model, preprocess, tokenizer = moeclip.load(args.model)
    model.eval()
    results = {}
    for spec in args.data:
        name, _, path = spec.partition("=")
        results[name] = gate_means(model, preprocess, tokenizer, path, args.rows)
    blocks = list(next(iter(results.values())))
    print("| block | " + " | ".join(f"gate on {n}" for n in results) + " |")
    print("|---|" + "---|" * len(results))
    for b in blocks:
        print(f"| {b} | " + " | ".join(f"{results[n][b]:.3f}" for n in results) + " |")


if __name__ == "__main__":
    main()
