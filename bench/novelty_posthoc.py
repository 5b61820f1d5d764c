"""Does the novelty gate need the MoE, or its training? An ablation for docs/results.md §4c.

A model already fine-tuned without any gate (a dense `dense_ft` model, or any dense CLIP of the base's shape)
gets the gate after the fact: one routed expert holding its FFNs, the base's FFNs as the frozen shared expert,
the gate fitted on the same training data (`moeclip.train.novelty_fit`), nothing trained. Both validation sets
are scored for the fine-tuned model and its gated version, with where the gate sends each set.

    python bench/novelty_posthoc.py --base checkpoints/base-tiny --model dense_ft=runs/adapt_s2/baselines/dense_ft/model \
        --train data/synth_muted/train.csv --data new=data/synth_muted/val.csv old=data/synth/val.csv \
        --seed 2 --json docs/novelty_posthoc.json
"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from moeclip.data.formats import open_dataset
from moeclip.eval.evaluate import evaluate
from moeclip.loader import load
from moeclip.model.ffn import ffn_state_dict
from moeclip.moe import moe_layers, upcycle
from moeclip.runtime import Runtime
from moeclip.train.novelty_fit import fit_novelty_gates, gate_shares


def gated(base: torch.nn.Module, tuned: torch.nn.Module) -> torch.nn.Module:
    """The base with each FFN an MoE layer of one routed expert (the tuned FFN) beside the base's, novelty-gated."""
    if moe_layers(tuned):
        raise SystemExit("--model must be a dense CLIP (an MoE is gated by training it with upcycle.shared_gate)")
    return upcycle(copy.deepcopy(base), experts=[ffn_state_dict(tuned)], top_k=1, shared_expert=True,
                   shared_gate="novelty")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--model", nargs="+", required=True, help="NAME=DIR, dense fine-tuned models of the base")
    ap.add_argument("--train", required=True, help="the data the models were fine-tuned on (fits the gate)")
    ap.add_argument("--data", nargs="+", required=True, help="NAME=VAL_TABLE, scored for every model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="merge results into this file, under the seed")
    args = ap.parse_args(argv)
    rt = Runtime.local()
    base, preprocess, tokenizer = load(args.base)
    train = open_dataset(args.train, preprocess)
    sets = dict(item.split("=", 1) for item in args.data)
    results: dict[str, dict] = {}
    for name, path in (item.split("=", 1) for item in args.model):
        tuned = load(path)[0]
        t0 = time.time()
        model = gated(base, tuned)
        fitted = fit_novelty_gates(model, train, tokenizer, rt, seed=args.seed)
        row = {"fit_seconds": round(time.time() - t0, 1), "fitted": fitted}
        for label, m in ((name, tuned), (f"{name}+novelty_gate", model)):
            row[label] = {s: evaluate(m, preprocess, tokenizer, p, runtime=rt, progress=False)["mean_R@1"]
                          for s, p in sets.items()}
        row["gate_shares"] = {s: gate_shares(model, open_dataset(p, preprocess), tokenizer, rt) for s, p in sets.items()}
        results[name] = row
        print(name, {k: v for k, v in row.items() if k not in ("fitted", "gate_shares")}, flush=True)
    if args.json:
        old = json.loads(args.json.read_text()) if args.json.exists() else {}
        old[f"seed_{args.seed}"] = {"command": " ".join(["python", *sys.argv]), **results}
        args.json.write_text(json.dumps(old, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
