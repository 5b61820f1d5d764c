"""Mean +- std over several DMU report.json files (seeds), as a markdown table.

    python bench/aggregate_reports.py runs/dmu_s0/report.json runs/dmu_s1/report.json ... [--out FILE]
"""
import argparse
import json
import statistics
from pathlib import Path

KEYS = ["image_to_text_R@1", "image_to_text_R@5", "image_to_text_R@10",
        "text_to_image_R@1", "text_to_image_R@5", "text_to_image_R@10", "mean_R@1"]


def _cell(values: list[float]) -> str:
    v = [100 * x for x in values]
    if len(v) == 1:
        return f"{v[0]:.1f}"
    return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}"


def table(reports: list[dict]) -> str:
    models = list(reports[0]["models"])
    factors = sorted(reports[0]["models"]["base"].get("factors", {}))
    head = ["model", *[k.replace("image_to_text", "i→t").replace("text_to_image", "t→i") for k in KEYS], *factors]
    lines = [f"n = {len(reports)} seed(s); mean ± std (sample) in %", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        if not all(m in r["models"] for r in reports):
            continue
        cells = [_cell([r["models"][m][k] for r in reports]) for k in KEYS]
        cells += [_cell([r["models"][m]["factors"][f] for r in reports]) for f in factors]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+")
    ap.add_argument("--out")
    args = ap.parse_args()
    text = table([json.loads(Path(p).read_text()) for p in args.reports])
    print(text)
    if args.out:
        Path(args.out).write_text(text)
