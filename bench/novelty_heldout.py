"""Old-domain retention on data nobody looked at: the check behind docs/results.md §4c's design caveat.

The novelty gate's design was picked by how many of the old domain's *validation* images each variant flagged
(seed 2). This scores the adapted models on another old-domain set, never looked at while designing it
(`data/synth_dev`: the default corpus drawn with synth seed 1, made by `bash bench/dmu_study.sh default`), with
where each gate sends it.

    python bench/novelty_heldout.py --data data/synth_dev/val.csv --json docs/novelty_heldout.json \
        --model dense_ft_s2=runs/adapt_s2/baselines/dense_ft/model drop_novelty_s0=runs/con/adapt_drop_novelty_s0/model ...
"""
import argparse
import json
import sys
from pathlib import Path

import moeclip
from moeclip.data.formats import open_dataset
from moeclip.eval.evaluate import evaluate
from moeclip.moe.novelty import novelty_gates
from moeclip.runtime import Runtime
from moeclip.train.novelty_fit import gate_shares


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the held-out validation table")
    ap.add_argument("--model", nargs="+", required=True, help="NAME=DIR")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rt = Runtime.local()
    results: dict[str, dict] = {}
    for name, path in (item.split("=", 1) for item in args.model):
        model, preprocess, tokenizer = moeclip.load(path)
        row = {"model": path, "mean_R@1": evaluate(model, preprocess, tokenizer, args.data, runtime=rt,
                                                   progress=False)["mean_R@1"]}
        if novelty_gates(model):
            row["gate_shares"] = gate_shares(model, open_dataset(args.data, preprocess), tokenizer, rt)
        results[name] = row
        print(name, row, flush=True)
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "data": args.data,
                                         "models": results}, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
