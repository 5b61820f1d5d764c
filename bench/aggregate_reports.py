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
    return "\n".join(lines) + "\n" + _target(reports) + _diagnostics(reports)


def _ms(v: list[float]) -> str:
    return f"{statistics.mean(v):+.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else f"{v[0]:+.1f}"


def _target(reports: list[dict]) -> str:
    """Issue 9's target per seed: DMU >= best baseline + 2 points, and >= 25% of the base's error removed."""
    rows = []
    for name in ("dmu", "dmu_router_experts"):
        if not all(name in r["models"] for r in reports):
            continue
        margin, removed = [], []
        for r in reports:
            m = {k: 100 * v["mean_R@1"] for k, v in r["models"].items()}
            best = max(m[b] for b in ("dense_ft", "upcycle") if b in m)
            margin.append(m[name] - best)
            removed.append(100 * (m[name] - m["base"]) / (100 - m["base"]))
        met = sum(a >= 2 and b >= 25 for a, b in zip(margin, removed))
        rows.append(f"| {name} | {_ms(margin)} | {_ms(removed)} | {met} of {len(reports)} |")
    if not rows:
        return ""
    return ("\n| model | mean R@1 - best of {dense_ft, upcycle} (target >= +2) | % of base error removed "
            "(target >= 25) | seeds meeting both |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")


def _diagnostics(reports: list[dict]) -> str:
    """Group counts per stage and how far apart the experts are: the ways DMU fails quietly."""
    if not all("mcl" in r and "expert_distance" in r for r in reports):
        return ""
    lines = ["", "| stage | accumulated groups | groups after merging | distance to base (rel. L2) |", "|---|---|---|---|"]
    for s in range(len(reports[0]["mcl"])):
        acc = [r["mcl"][s]["num_accumulated"] for r in reports]
        grp = [r["mcl"][s]["num_groups"] for r in reports]
        dist = [r["expert_distance"][s + 1][0] for r in reports]
        lines.append(f"| {s + 1} | {' / '.join(map(str, acc))} | {' / '.join(map(str, grp))} | "
                     f"{' / '.join(f'{d:.4f}' for d in dist)} |")
    pair = [min(r["expert_distance"][a][b] for a in range(1, len(r["expert_distance"]))
                for b in range(1, len(r["expert_distance"])) if a != b) for r in reports
            if len(r["expert_distance"]) > 2]
    if pair:
        lines.append(f"\nClosest pair of MCL experts (rel. L2), per seed: {' / '.join(f'{d:.4f}' for d in pair)}")
    usage = [r["expert_usage"] for r in reports if r.get("expert_usage")]
    if usage:
        cv = [statistics.mean(u["load_cv"] for u in us) for us in usage]
        above = [sum(u["mi_bits"] > u["mi_null_p95_bits"] for u in us) for us in usage]
        mi = [statistics.mean(u["mi_bits"] for u in us) for us in usage]
        lines.append(f"Router of the DMU model, per seed: mean load CV {' / '.join(f'{c:.3f}' for c in cv)}; "
                     f"mean MI(expert; {reports[0].get('expert_group_by')}) {' / '.join(f'{m:.4f}' for m in mi)} bits, "
                     f"above the shuffled-label p95 in {' / '.join(map(str, above))} of {len(usage[0])} layers")
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
