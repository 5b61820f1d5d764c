"""WiSE-FT in the adaptation scenario: each adapted model pulled back towards the base, scored on both domains.

docs/results.md §4 asks whether an expert construction keeps the old domain better than a retention method that
is not one. WiSE-FT (Wortsman et al. 2022) interpolates the weights of the fine-tuned model with the base's,
theta = (1 - alpha) base + alpha tuned, with no training and no old data (moeclip.moe.interpolate). It applies to
every model alike, baselines included, so the table gives each model's whole new/old trade-off. alpha = 0.5 is
fixed in advance (the paper's default) as the headline; the grid is shown, not picked from, since the two
validation sets are the reported ones. alpha = 0 is the base for every model, so it is not scored again.

    python bench/wise_ft.py --label s0 --base checkpoints/base-tiny \
        --model dmu=runs/adapt_s0/model upcycle=runs/adapt_s0/baselines/upcycle/model \
                dense_ft=runs/adapt_s0/baselines/dense_ft/model \
                drop_upcycle=runs/con/adapt_drop_s0/baselines/drop_upcycle/model \
        --data new=data/synth_muted/val.csv old=data/synth/val.csv --json docs/wise_ft.json --out docs/wise_ft.md

Each call adds (or replaces) one label's scores per model and alpha in the JSON and rewrites the table from every
label in it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from common import mean_std  # bench/common.py: the study tables' cell format

import moeclip
from moeclip.eval.evaluate import evaluate
from moeclip.moe.interpolate import interpolate_with_base

ALPHAS = (0.25, 0.5, 0.75, 0.9, 1.0)  # 0 is the base itself for every model (tests/moe/test_interpolate.py)
BASELINES = ("upcycle", "dense_ft")


def _pairs(specs: list[str], what: str) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not Path(path).exists():
            raise SystemExit(f"--{what} {spec!r}: expected NAME=PATH with an existing path")
        out[name] = path
    return out


def score(base_dir: str, models: dict[str, str], data: dict[str, str], alphas: list[float],
          batch: int) -> dict[str, dict[str, dict[str, float]]]:
    """{model: {alpha: {data set: mean R@1 in points}}}."""
    base, preprocess, tokenizer = moeclip.load(base_dir)
    base.eval()
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, path in models.items():
        for alpha in alphas:
            model = interpolate_with_base(moeclip.load(path)[0].eval(), base, alpha)
            out.setdefault(name, {})[f"{alpha:g}"] = {
                vset: round(100 * evaluate(model, preprocess, tokenizer, table, batch_size=batch,
                                           progress=False)["mean_R@1"], 2)
                for vset, table in data.items()}
            print(f"{name} alpha={alpha:g}: " + ", ".join(f"{k} {v:.1f}" for k, v in out[name][f'{alpha:g}'].items()),
                  file=sys.stderr, flush=True)
            del model
    return out


def table(results: dict[str, dict]) -> str:
    """Mean ± std over labels (seeds) per model and alpha, with each cell's margin over the same seed's better
    fine-tuned baseline (alpha 1) on that data set."""
    labels = sorted(results)
    first = results[labels[0]]
    sets = list(next(iter(next(iter(first.values())).values())))
    lines = [f"Labels (seeds): {', '.join(labels)}. Margin = cell minus the same seed's better fine-tuned baseline "
             f"({' or '.join(BASELINES)} at alpha 1) on that data set.", "",
             "| model | alpha | " + " | ".join(f"{s} | {s} margin" for s in sets) + " |",
             "|---|---|" + "---|---|" * len(sets)]
    for name in first:
        for alpha in sorted(first[name], key=float):
            cells = []
            for s in sets:
                vals = [results[lb][name][alpha][s] for lb in labels]
                best = [max(results[lb][b]["1"][s] for b in BASELINES if b in results[lb]) for lb in labels]
                cells += [mean_std(vals), mean_std([v - b for v, b in zip(vals, best)], signed=True)]
            lines.append(f"| {name} | {alpha} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", required=True, help="this call's name in the JSON, e.g. the seed")
    ap.add_argument("--base", required=True, help="the model every adapted model started from")
    ap.add_argument("--model", nargs="+", required=True, help="NAME=MODEL_DIR (moeclip.load), one per model")
    ap.add_argument("--data", nargs="+", required=True, help="NAME=CSV, one per validation set")
    ap.add_argument("--alphas", nargs="+", type=float, default=list(ALPHAS))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--json", required=True, help="scores of every label so far (read, updated, rewritten)")
    ap.add_argument("--out", help="markdown table of every label in --json")
    args = ap.parse_args()
    models, data = _pairs(args.model, "model"), _pairs(args.data, "data")
    if not any(b in models for b in BASELINES):
        raise SystemExit(f"--model needs at least one baseline ({', '.join(BASELINES)}) for the margins")
    torch.manual_seed(0)
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.exists() else {}
    for name, by_alpha in score(args.base, models, data, args.alphas, args.batch).items():
        results.setdefault(args.label, {}).setdefault(name, {}).update(by_alpha)  # more alphas add to a label
    path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    text = table(results)
    if args.out:
        Path(args.out).write_text("# WiSE-FT in the adaptation scenario (bench/wise_ft.py)\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()
