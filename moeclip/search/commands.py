"""`moeclip index` and `moeclip search`: argument parsing and printing only; the work is in the library."""
from __future__ import annotations

import argparse
import json


def cmd_index(args: argparse.Namespace) -> None:
    from moeclip import load
    from moeclip.search.index import build_index, model_reference
    model, preprocess, _ = load(args.model, pretrained=args.pretrained, device=args.device)
    info = build_index(model, preprocess, args.images, args.out, model_reference(args.model),
                       pretrained=args.pretrained, batch_size=args.batch_size, device=args.device,
                       num_workers=args.workers, commit_every=args.commit_every, limit=args.limit,
                       image_root=args.image_root)
    skipped = info["skipped"]
    speed = f", {info['images_per_second']:.1f} images/s" if info.get("images_per_second") else ""
    if info["complete"]:
        print(f"index {args.out}: {info['count']} images embedded (dim {info['dim']}), {len(skipped)} skipped"
              f"{speed}" + ("" if info["embedded_this_run"] else " (already complete)"))
    else:
        print(f"index {args.out}: stopped at {info['next']} of {info['num_sources']} images ({info['rows']} "
              f"embedded, {len(skipped)} skipped{speed}); re-run the same command to continue")
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s):")
        for s in skipped:
            print(f"  {s['path']}: {s['reason']}")


def cmd_search(args: argparse.Namespace) -> None:
    from moeclip.search.query import embed_query, load_index_model, open_index, search
    index = open_index(args.index)
    model, preprocess, tokenizer = load_index_model(index, args.device)
    query = embed_query(model, preprocess, tokenizer, text=args.text, image=args.image, device=args.device)
    results = search(index, query, k=args.k)
    if args.json:
        print(json.dumps({"index": str(args.index), "query": {"text": args.text, "image": args.image},
                          "results": results}, indent=2, ensure_ascii=False))
        return
    for r in results:
        print(f"{r['rank']:>4}  {r['score']:+.4f}  {r['path']}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("index", help="embed a folder (or CSV) of images into a resumable search index")
    i.add_argument("--model", required=True, help="moeclip model directory, or open_clip 'ARCH:TAG'")
    i.add_argument("--pretrained", default=None, help="open_clip pretrained tag or weights file (with an ARCH)")
    i.add_argument("--images", required=True, help="folder (searched recursively), CSV/TSV with a filepath column, "
                   "or a ShareGPT4V / Karpathy caption .json")
    i.add_argument("--image-root", default=None, help="folder a table's or JSON's relative image paths start from "
                   "(default: its folder)")
    i.add_argument("--out", required=True, help="index folder (re-running continues an unfinished one)")
    i.add_argument("--batch-size", type=int, default=64)
    i.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding images")
    i.add_argument("--commit-every", type=int, default=8, help="save progress every N batches (default 8)")
    i.add_argument("--limit", type=int, default=None, help="embed at most N more images, then stop (resumable)")
    i.add_argument("--device", default=None, help="default: the first GPU, else the CPU")
    i.set_defaults(func=cmd_index)

    s = sub.add_parser("search", help="rank the images of an index by a text or image query")
    s.add_argument("--index", required=True, help="index folder written by `moeclip index`")
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", help="text query, e.g. 'a cat'")
    q.add_argument("--image", help="image file query")
    s.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--device", default=None, help="default: the first GPU, else the CPU")
    s.set_defaults(func=cmd_search)
