"""`moeclip` command line: thin wrappers over the library; errors print one line, not a traceback."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_synth(args: argparse.Namespace) -> None:
    from moeclip.data.synth import PRESETS, SynthSpec, write_corpus
    paths = write_corpus(args.out, SynthSpec(train=args.train, val=args.val, seed=args.seed, preset=args.preset,
                                             image_size=args.image_size), format=args.format,
                         shard_size=args.shard_size)
    print(f"wrote {paths['train']} ({args.train} rows) and {paths['val']} ({args.val} rows); "
          f"factors in {Path(args.out) / 'factors.json'}")


def cmd_eval(args: argparse.Namespace) -> None:
    from moeclip import io, load
    from moeclip.eval.evaluate import evaluate, format_table
    from moeclip.eval.zeroshot import DEFAULT_TEMPLATES, evaluate_zeroshot, load_classnames, load_templates
    from moeclip.runtime import Runtime
    if args.templates and args.template:
        raise ValueError("give --templates (a name or file) or --template (repeatable), not both")
    if (args.task == "zeroshot" or args.classnames) and not args.class_column:
        raise ValueError("zero-shot classification needs --class-column (the column holding each image's class)")
    classnames = load_classnames(args.classnames) if args.classnames else None
    templates = load_templates(args.templates) if args.templates else (args.template or list(DEFAULT_TEMPLATES))
    runtime = Runtime.local(args.device, args.precision)
    model, preprocess, tokenizer = load(args.model, pretrained=args.pretrained, device=runtime.device)
    if args.task == "zeroshot":
        metrics = evaluate_zeroshot(model, preprocess, tokenizer, args.data, args.class_column, classnames,
                                    templates, batch_size=args.batch_size, runtime=runtime,
                                    num_workers=args.workers, image_root=args.image_root)
    else:
        metrics = evaluate(model, preprocess, tokenizer, args.data, class_column=args.class_column,
                           templates=templates, classnames=classnames, batch_size=args.batch_size,
                           runtime=runtime, num_workers=args.workers, split=args.split,
                           image_root=args.image_root, protocol=args.protocol)
    print(format_table(metrics))
    if args.out:
        io.write_json(args.out, metrics)
        print(f"metrics written to {args.out}")


def cmd_info(args: argparse.Namespace) -> None:
    from moeclip import load
    from moeclip.moe import moe_layers
    model, _, _ = load(args.model, pretrained=args.pretrained)
    n = sum(p.numel() for p in model.parameters())
    layers = moe_layers(model)
    print(f"{args.model}: {model.moeclip_arch['arch']}, {n / 1e6:.2f}M parameters, {len(layers)} MoE layers")
    for tower, block, layer in layers:
        print(f"  {tower} block {block}: {layer.num_experts} experts, top-{layer.top_k}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moeclip", description="Sparse Mixture-of-Experts CLIP by Diversified "
                                "Multiplet Upcycling. The training pipeline is `accelerate launch recipes/dmu.py`.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write the synthetic image-caption corpus (PNG + train.csv/val.csv, or "
                       "webdataset shards)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--train", type=int, default=20000, help="training rows (default 20000)")
    s.add_argument("--val", type=int, default=2000, help="validation rows (default 2000)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--preset", default="default", help="factor salience preset: default or muted")
    s.add_argument("--image-size", type=int, default=32)
    s.add_argument("--format", default="csv", choices=["csv", "wds"], help="csv: PNG files + train.csv/val.csv; "
                   "wds: webdataset shards train-NNNNNN.tar / val-NNNNNN.tar (png + txt + json of the factors)")
    s.add_argument("--shard-size", type=int, default=1000, help="samples per shard (--format wds; default 1000)")
    s.set_defaults(func=cmd_synth)

    e = sub.add_parser("eval", help="retrieval R@1/5/10, zero-shot accuracy and per-factor probe on a CSV/TSV")
    e.add_argument("--model", required=True, help="moeclip model directory, or open_clip 'ARCH:TAG'")
    e.add_argument("--pretrained", default=None, help="open_clip pretrained tag or weights file (with an ARCH)")
    e.add_argument("--data", required=True, help="CSV/TSV with filepath,title columns, a COCO/Flickr "
                   "Karpathy-split caption .json, a ShareGPT4V caption .json, or webdataset shards "
                   "('dir/{000000..000009}.tar')")
    e.add_argument("--split", default="test", help="Karpathy split to evaluate (.json data; default test)")
    e.add_argument("--image-root", default=None, help="folder the data's relative image paths start from "
                   "(default: the data file's folder)")
    e.add_argument("--out", default=None, help="write metrics JSON here")
    e.add_argument("--protocol", default="per_caption", choices=["per_caption", "multi_positive"],
                   help="retrieval positives. per_caption (default): every caption row is its own query with its own "
                   "image the only positive, as COCO/Flickr30k papers and CLIP_benchmark count; multi_positive: "
                   "identical caption strings merge into one query whose positives are all their images")
    e.add_argument("--task", default="all", choices=["all", "zeroshot"],
                   help="all: retrieval (+ zero-shot with --class-column, + factor probe); zeroshot: only zero-shot "
                   "classification of a CSV/TSV with filepath and --class-column (no caption column needed)")
    e.add_argument("--class-column", default=None, help="column holding each image's class (a class name, or "
                   "an index into --classnames)")
    e.add_argument("--classnames", default=None, help="'imagenet' (OpenAI's 1000 names, from open_clip) or a text "
                   "file, one class name per line (default: the class column's distinct values)")
    e.add_argument("--templates", default=None, help="'openai' (OpenAI's 80 ImageNet prompts), 'simple', or a text "
                   "file, one template per line with {} or {c} for the class name")
    e.add_argument("--template", action="append", help="one prompt template with {} (repeatable; default "
                   "'a photo of a {}.')")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--workers", type=int, default=0)
    e.add_argument("--device", default=None, help="default: the first GPU, else the CPU")
    e.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"],
                   help="autocast dtype; bf16 reproduces a recipe run with mixed_precision bf16 (default: none)")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("info", help="describe a model (architecture, parameters, MoE layers)")
    i.add_argument("model")
    i.add_argument("--pretrained", default=None)
    i.set_defaults(func=cmd_info)

    from moeclip.consolidate import add_command as add_consolidate_command
    add_consolidate_command(sub)
    from moeclip.model.clip_moe_layout import add_commands as add_layout_commands
    add_layout_commands(sub)
    from moeclip.compress import add_commands as add_compress_commands
    add_compress_commands(sub)
    from moeclip.wise_ft import add_command as add_wise_ft_command
    add_wise_ft_command(sub)

    from moeclip.analysis.commands import add_commands as add_analysis_commands
    from moeclip.search.commands import add_commands as add_search_commands
    add_search_commands(sub)
    add_analysis_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"moeclip {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
