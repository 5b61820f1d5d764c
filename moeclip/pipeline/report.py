"""report.json -> report.md: the numbers as they are, with the diagnostics that show whether DMU
did anything (group counts, what the clusters follow, how far apart the experts are, how the
router uses them). The verdict lines are computed, never written by hand. The main model is `report["construction"]`
(DMU unless `construction=drop_upcycle`; reports from before that key are DMU's)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from moeclip import io
from moeclip.pipeline.constructions import BUILT, LABELS
from moeclip.pipeline.costs import costs_markdown

RETRIEVAL = ["image_to_text_R@1", "image_to_text_R@5", "image_to_text_R@10",
             "text_to_image_R@1", "text_to_image_R@5", "text_to_image_R@10", "mean_R@1"]


def _pct(x: Any) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def render_markdown(report: dict[str, Any]) -> str:
    models = report["models"]
    main = report.get("construction", "dmu")
    factor_names = sorted({f for m in models.values() for f in m.get("factors", {})})
    head = ["model", *[k.replace("image_to_text", "i→t").replace("text_to_image", "t→i") for k in RETRIEVAL],
            *[f"{f} (chance {_pct(next(iter(models.values()))['factors_chance'][f])})" for f in factor_names]]
    title = ["# DMU report"] if main == "dmu" else [
        f"# {LABELS[main]} report", "", f"Construction `{main}`: the main model (`{main}`) is {BUILT[main]}. "
        "`construction=dmu` is the published DMU."]
    lines = [*title, "", "Retrieval on the validation split (%), and the per-factor probe "
             "(accuracy at telling one factor with every other one right).", "", protocol_line(report), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in models.items():
        cells = [name, *[_pct(m.get(k)) for k in RETRIEVAL], *[_pct(m.get("factors", {}).get(f)) for f in factor_names]]
        lines.append("| " + " | ".join(cells) + " |")
    data = report.get("data")
    if data:
        lost = ", ".join(f"{n} {r}" for r, n in data["skipped"].items()) or "none"
        lines += ["", f"Training data: `{data['train']}` ({data['format']}), {data['rows']} rows; samples skipped: "
                  f"{lost}."]
    lines += ["", f"## Where {LABELS[main]} stands", ""] + verdict(models, main)
    if main == "dmu":
        lines += ["", "## MCL stages", "", "| stage | joint clusters | accumulated groups | groups after merging "
                  "(merges) | largest / smallest group | image clusters follow (NMI) | text clusters follow (NMI) |",
                  "|---|---|---|---|---|---|---|"]
    for s, c in enumerate(report.get("mcl", []), start=1):
        lines.append(f"| {s} | {c['num_joint']} | {c['num_accumulated']} | {c['num_groups']} ({c['merged_small_groups']})"
                     f" | {c['group_sizes'][0]} / {c['group_sizes'][-1]} | {_top_nmi(c, 'image')} | {_top_nmi(c, 'text')} |")
    dist = report.get("expert_distance")
    if dist:
        lines += ["", "## Expert diversity", "", "Relative L2 distance between the FFN weight sets "
                  "(expert 0 = base). Near-zero off-diagonal values mean near-duplicate experts.", "",
                  "| | " + " | ".join(f"e{j}" for j in range(len(dist))) + " |", "|---|" + "---|" * len(dist)]
        for i, row in enumerate(dist):
            lines.append(f"| e{i} | " + " | ".join(f"{v:.4f}" for v in row) + " |")
    usage = report.get("expert_usage")
    if usage:
        group = report.get("expert_group_by")
        e0 = " (e0 = base)" if main == "dmu" else ""  # Drop-Upcycling re-draws part of every expert
        lines += ["", f"## Expert usage of the {LABELS[main]} model (validation, real tokens)", "",
                  f"Load = share of routed slots per expert{e0}; CV 0 = balanced."
                  + (f" MI = mutual information between the `{group}` of a token's sample and its expert choice, "
                     "against the 95th percentile of shuffled labels." if group else ""), "",
                  "| tower | block | load per expert | top-1 share | load CV |" + (" MI bits (null p95) |" if group else ""),
                  "|---|---|---|---|---|" + ("---|" if group else "")]
        for u in usage:
            mi = f" {u['mi_bits']:.4f} ({u['mi_null_p95_bits'] or 0:.4f}) |" if "mi_bits" in u else ""
            lines.append(f"| {u['tower']} | {u['block']} | {' / '.join(f'{x:.2f}' for x in u['load'])} | "
                         f"{' / '.join(f'{x:.2f}' for x in u['top1'])} | {u['load_cv']:.3f} |{mi}")
        for name, path in report.get("expert_pictures", {}).items():
            lines.append(f"\n![{name}]({path})")
    gates = report.get("novelty_gate")
    if gates:
        names = sorted({g for sets in gates.values() for g in sets})
        lines += ["", "## Novelty gate", "", "Share of each validation set's samples the shared expert's novelty gate "
                  "sends to the base FFN (gate >= 0.5; mean gate in brackets): images for the image tower's gate, "
                  "captions for the text tower's. By construction about 1% of samples like the training data go there.",
                  "", "| set | " + " | ".join(f"`{g}`" for g in names) + " |", "|---|" + "---|" * len(names)]
        for name, sets in gates.items():
            lines.append(f"| {name} | " + " | ".join(f"{100 * sets[g]['to_base']:.1f}% ({sets[g]['mean_gate']:.2f})"
                                                      if g in sets else "" for g in names) + " |")
    lines += costs_markdown(report)
    plots = report.get("plots", {})
    if plots:
        lines += ["", "## Plots", "", "Loss curves of every training step (the loop's logged steps), and retrieval "
                  "R@1 model by model. Per-layer expert load: the heatmaps above. The same numbers, live: "
                  f"`tensorboard --logdir {report.get('logs', 'logs')}`.", ""]
        lines += [f"![{name}]({path})" for name, path in plots.items()]
    lines += ["", "## Budgets (training samples) and timings (seconds, when each step ran)", "",
              "| item | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in {**report.get("budgets", {}), **report.get("timings", {})}.items()]
    env = report.get("environment")
    if env:
        lines += ["", "## Environment", "", "The machine and code these numbers came from: when a run does not "
                  "repeat another day's, compare this first.", "",
                  ", ".join(f"{k} `{v}`" for k, v in env.items())]
    lines.append("")
    return "\n".join(lines)


def protocol_line(report: dict[str, Any]) -> str:
    """Which retrieval protocol made the numbers: they are not comparable across protocols."""
    protocol = report.get("protocol") or next(iter(report["models"].values()), {}).get("protocol", "multi_positive")
    if protocol == "per_caption":
        return ("Protocol `per_caption`: every caption row is its own query, its own image the only positive "
                "(as COCO/Flickr30k papers and CLIP_benchmark count).")
    return ("Protocol `multi_positive`: identical captions are merged into one query whose positives are all their "
            "images (not comparable with published numbers; `eval_protocol=per_caption` is those).")


def verdict(models: dict[str, Any], main: str = "dmu") -> list[str]:
    """The main model (`main`: dmu, or the construction that replaced it) against every other model."""
    label = LABELS[main]
    if main not in models or "base" not in models:
        return [f"({label} or base missing from this report)"]
    d = models[main]["mean_R@1"]
    n = models[main].get("num_images", 0)
    # binomial standard error of a difference of two R@1s on n queries per direction, both directions averaged
    noise = 100 * 2 * math.sqrt(max(d * (1 - d), 1e-4) / max(2 * n, 1)) * math.sqrt(2)
    out = []
    for other in [m for m in models if m != main]:
        delta = 100 * (d - models[other]["mean_R@1"])
        if abs(delta) < 0.05:
            out.append(f"- {label} mean R@1 equals `{other}`'s.")
            continue
        word = "above" if delta > 0 else "below"
        flag = "" if abs(delta) >= noise else " (within noise)"
        out.append(f"- {label} mean R@1 is {abs(delta):.1f} points {word} `{other}`{flag}.")
    base = models["base"]["mean_R@1"]
    if base < 1:
        removed = 100 * (d - base) / (1 - base)
        note = " (negative: it adds error)." if removed < 0 else " (the target is 25%)."
        out.append(f"- {label} removes {removed:.0f}% of the base's R@1 error{note}")
    out.append(f"- One seed, {n} validation images: differences under ~{noise:.1f} points (2 standard errors) "
               "are within noise.")
    return out


def _top_nmi(c: dict, modality: str) -> str:
    nmi = c.get("nmi", {}).get(modality)
    if not nmi:
        return "–"
    top = sorted(nmi.items(), key=lambda kv: -kv[1])[:2]
    return ", ".join(f"{k} {v:.2f}" for k, v in top)


def write_report(out_dir: str | Path, report: dict[str, Any]) -> None:
    io.write_json(Path(out_dir) / "report.json", report)
    io.write_text(Path(out_dir) / "report.md", render_markdown(report))
