"""`moeclip export --dense` and `moeclip prune`: a smaller model from a trained MoE, judged on the user's data.

Expert loads come from one routing pass over `--data` (`moeclip.analysis.analyse_experts`, real tokens only);
the merge/prune itself is `moeclip.moe.merge`. Every candidate is scored by retrieval (mean R@1 of
`moeclip.eval.evaluate.evaluate`) on the same data, next to the MoE it came from, so the user sees what the
smaller model keeps. `export --dense --method auto` builds both merges (load-weighted and plain average) and
keeps the one with the higher mean R@1 (a tie keeps the load-weighted one).
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any, Callable

from torch import nn

from moeclip.moe.merge import LayerKey, merge_to_dense, prune_experts
from moeclip.runtime import Runtime

MERGE_METHODS = ("auto", "load", "mean")


def measure_loads(model: nn.Module, preprocess: Callable, tokenizer: Callable, data: str | Path,
                  runtime: Runtime | None = None, max_rows: int = 2048, batch_size: int = 64,
                  image_root: str | Path | None = None, split: str = "test") -> dict[LayerKey, list[float]]:
    """(tower, block) -> share of routed slots per expert on the first `max_rows` rows of `data`."""
    from moeclip.analysis import analyse_experts
    result = analyse_experts(model, preprocess, tokenizer, data, max_rows=max_rows, batch_size=batch_size,
                             runtime=runtime, progress=False, null_permutations=0, split=split,
                             image_root=image_root)
    return {(layer["tower"], layer["block"]): list(layer["load"]) for layer in result["layers"]}


def retrieval(model: nn.Module, preprocess: Callable, tokenizer: Callable, data: str | Path,
              runtime: Runtime | None, image_root: str | Path | None = None, split: str = "test") -> dict[str, float]:
    from moeclip.eval.evaluate import evaluate
    m = evaluate(model, preprocess, tokenizer, data, runtime=runtime, progress=False, image_root=image_root,
                 split=split)
    return {k: float(m[k]) for k in ("mean_R@1", "image_to_text_R@1", "text_to_image_R@1")}


def dense_candidates(moe: nn.Module, loads: dict[LayerKey, list[float]], method: str) -> dict[str, nn.Module]:
    if method not in MERGE_METHODS:
        raise ValueError(f"--method {method!r}; expected one of {', '.join(MERGE_METHODS)}")
    out = {}
    if method in ("auto", "load"):
        out["load"] = merge_to_dense(copy.deepcopy(moe), loads)
    if method in ("auto", "mean"):
        out["mean"] = merge_to_dense(copy.deepcopy(moe), None)
    return out


def export_dense(model_dir: str | Path, out: str | Path, data: str | Path, method: str = "auto",
                 runtime: Runtime | None = None, max_rows: int = 2048, batch_size: int = 64,
                 image_root: str | Path | None = None, split: str = "test") -> dict[str, Any]:
    """Merge the MoE at `model_dir` into a dense model directory `out`; returns what was measured and kept."""
    from moeclip import load, save_model_dir
    from moeclip.moe import moe_layers
    rt = runtime or Runtime.local()
    moe, preprocess, tokenizer = load(model_dir, device=rt.device)
    if not moe_layers(moe):
        raise ValueError(f"{model_dir}: a dense model; export --dense needs an MoE model")
    loads = measure_loads(moe, preprocess, tokenizer, data, rt, max_rows, batch_size, image_root, split)
    report: dict[str, Any] = {"moe": retrieval(moe, preprocess, tokenizer, data, rt, image_root, split),
                              "loads": {f"{t} {b}": v for (t, b), v in loads.items()}, "candidates": {}}
    best_name, best_model = None, None
    for name, cand in dense_candidates(moe, loads, method).items():
        report["candidates"][name] = retrieval(cand, preprocess, tokenizer, data, rt, image_root, split)
        if best_name is None or report["candidates"][name]["mean_R@1"] > report["candidates"][best_name]["mean_R@1"]:
            best_name, best_model = name, cand
    report["kept"] = best_name
    save_model_dir(best_model, out, extra={"merged_from": str(model_dir), "merge": best_name,
                                           "merge_data": str(data), "retrieval": report})
    return report


def prune_model(model_dir: str | Path, out: str | Path, data: str | Path, keep: int,
                runtime: Runtime | None = None, max_rows: int = 2048, batch_size: int = 64,
                image_root: str | Path | None = None, split: str = "test") -> dict[str, Any]:
    """Keep the `keep` most-used experts per layer of the MoE at `model_dir`; writes a model directory `out`."""
    from moeclip import load, save_model_dir
    rt = runtime or Runtime.local()
    moe, preprocess, tokenizer = load(model_dir, device=rt.device)
    from moeclip.moe import moe_layers
    layers = moe_layers(moe)
    if not layers:
        raise ValueError(f"{model_dir}: a dense model; prune needs an MoE model")
    if not 1 <= keep <= layers[0][2].num_experts:
        raise ValueError(f"--keep {keep}: {model_dir} has {layers[0][2].num_experts} experts per layer; "
                         f"keep 1..{layers[0][2].num_experts}")
    loads = measure_loads(moe, preprocess, tokenizer, data, rt, max_rows, batch_size, image_root, split)
    before = retrieval(moe, preprocess, tokenizer, data, rt, image_root, split)
    kept = prune_experts(moe, loads, keep)
    after = retrieval(moe, preprocess, tokenizer, data, rt, image_root, split)
    report = {"moe": before, "pruned": after, "keep": keep, "top_k": moe_top_k(moe),
              "kept_experts": {f"{t} {b}": v for (t, b), v in kept.items()},
              "loads": {f"{t} {b}": v for (t, b), v in loads.items()}}
    save_model_dir(moe, out, extra={"pruned_from": str(model_dir), "prune_data": str(data), "retrieval": report})
    return report


def moe_top_k(model: nn.Module) -> int:
    from moeclip.moe import moe_layers
    return moe_layers(model)[0][2].top_k


# ---------------------------------------------------------------------------------------------- command line

def _r1(m: dict[str, float]) -> str:
    return f"mean R@1 {100 * m['mean_R@1']:.2f} (i->t {100 * m['image_to_text_R@1']:.1f}, " \
           f"t->i {100 * m['text_to_image_R@1']:.1f})"


def add_measure_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The options that say where loads and retrieval are measured (shared by export --dense and prune)."""
    p.add_argument("--data", required=required, help="CSV/TSV (or Karpathy/ShareGPT4V .json) the expert loads and "
                   "retrieval are measured on, e.g. val.csv")
    p.add_argument("--image-root", default=None, help="folder the data's relative image paths start from")
    p.add_argument("--split", default="test", help="Karpathy split (.json data only; default test)")
    p.add_argument("--max-rows", type=int, default=2048, help="rows used to measure expert loads (default 2048)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="default: the first GPU, else the CPU")
    p.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"], help="autocast dtype (default: none)")


def cmd_export_dense(args: argparse.Namespace) -> None:
    if not args.data:
        raise ValueError("export --dense needs --data (a table to measure expert loads and retrieval on)")
    rt = Runtime.local(args.device, args.precision)
    r = export_dense(args.model, args.out, args.data, args.method, rt, args.max_rows, args.batch_size,
                     args.image_root, args.split)
    print(f"MoE            {_r1(r['moe'])}")
    for name, m in r["candidates"].items():
        label = "load-weighted" if name == "load" else "plain average"
        print(f"{label:<14} {_r1(m)}  ({100 * (m['mean_R@1'] - r['moe']['mean_R@1']):+.2f} vs the MoE)")
    print(f"wrote {args.out}: dense, {'load-weighted' if r['kept'] == 'load' else 'plain'} average of the experts")


def cmd_prune(args: argparse.Namespace) -> None:
    rt = Runtime.local(args.device, args.precision)
    r = prune_model(args.model, args.out, args.data, args.keep, rt, args.max_rows, args.batch_size,
                    args.image_root, args.split)
    print(f"MoE            {_r1(r['moe'])}")
    change = 100 * (r['pruned']['mean_R@1'] - r['moe']['mean_R@1'])
    print(f"pruned to {r['keep']:<4} {_r1(r['pruned'])}  ({change:+.2f} vs the MoE), top-{r['top_k']}")
    print(f"wrote {args.out}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="drop the least-used experts of every MoE layer (usage measured on --data)")
    p.add_argument("--keep", type=int, required=True, help="experts to keep per layer; top-k becomes min(top-k, K)")
    p.add_argument("model", help="moeclip MoE model directory")
    p.add_argument("out", help="the model directory to write")
    add_measure_arguments(p)
    p.set_defaults(func=cmd_prune)
