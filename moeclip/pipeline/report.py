"""report.json -> report.md: the numbers as they are, with the diagnostics that show whether DMU
did anything (group counts, what the clusters follow, how far apart the experts are, how the
router uses them). The verdict lines are computed, never written by hand."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from moeclip import io
from moeclip.data.dataset import CaptionDataset, Collate
from moeclip.moe import moe_layers

RETRIEVAL = ["image_to_text_R@1", "image_to_text_R@5", "image_to_text_R@10",
             "text_to_image_R@1", "text_to_image_R@5", "text_to_image_R@10", "mean_R@1"]


@torch.no_grad()
def expert_usage(model: nn.Module, preprocess: Callable, tokenizer: Callable, table: str | Path,
                 max_rows: int = 512, batch_size: int = 128) -> list[dict[str, Any]]:
    """Per MoE layer: share of routed slots per expert, share as top-1, and the load's coefficient of variation."""
    ds = CaptionDataset(table, preprocess)
    layers = moe_layers(model)
    slots = {(t, b): None for t, b, _ in layers}
    top1 = {(t, b): None for t, b, _ in layers}
    collate = Collate(tokenizer)
    for a in range(0, min(max_rows, len(ds)), batch_size):
        batch = collate([ds[i] for i in range(a, min(a + batch_size, max_rows, len(ds)))])
        if "image" not in batch:
            continue
        for tower, encode in (("visual", lambda: model.encode_image(batch["image"])),
                              ("text", lambda: model.encode_text(batch["text"]))):
            encode()
            for t, b, layer in layers:
                if t != tower or layer.last_routing is None:
                    continue
                r, mask = layer.last_routing, layer.last_mask
                chosen = r.experts if mask is None else r.experts[mask]
                e = r.num_experts
                c = torch.bincount(chosen.flatten(), minlength=e).double()
                c1 = torch.bincount(chosen[:, 0], minlength=e).double()
                slots[(t, b)] = c if slots[(t, b)] is None else slots[(t, b)] + c
                top1[(t, b)] = c1 if top1[(t, b)] is None else top1[(t, b)] + c1
    out = []
    for (t, b), c in slots.items():
        if c is None:
            continue
        share = c / c.sum()
        cv = float(share.std(unbiased=False) / share.mean())
        out.append({"tower": t, "block": b, "load": [round(float(x), 4) for x in share],
                    "top1": [round(float(x), 4) for x in top1[(t, b)] / top1[(t, b)].sum()],
                    "load_cv": round(cv, 4)})
    return out


def _pct(x: Any) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def render_markdown(report: dict[str, Any]) -> str:
    models = report["models"]
    factor_names = sorted({f for m in models.values() for f in m.get("factors", {})})
    head = ["model", *[k.replace("image_to_text", "i→t").replace("text_to_image", "t→i") for k in RETRIEVAL],
            *[f"{f} (chance {_pct(next(iter(models.values()))['factors_chance'][f])})" for f in factor_names]]
    lines = ["# DMU report", "", "Retrieval on the validation split (%), and the per-factor probe "
             "(accuracy at telling one factor with every other one right).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in models.items():
        cells = [name, *[_pct(m.get(k)) for k in RETRIEVAL], *[_pct(m.get("factors", {}).get(f)) for f in factor_names]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Where DMU stands", ""] + verdict(models)
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
        lines += ["", "## Expert usage of the DMU model (validation, real tokens)", "",
                  "| tower | block | load per expert | top-1 share | load CV |", "|---|---|---|---|---|"]
        for u in usage:
            lines.append(f"| {u['tower']} | {u['block']} | {' / '.join(f'{x:.2f}' for x in u['load'])} | "
                         f"{' / '.join(f'{x:.2f}' for x in u['top1'])} | {u['load_cv']:.3f} |")
    lines += ["", "## Budgets and timings", "", f"samples: {report.get('budgets', {})}",
              f"seconds: {report.get('timings', {})}", ""]
    return "\n".join(lines)


def verdict(models: dict[str, Any]) -> list[str]:
    if "dmu" not in models or "base" not in models:
        return ["(DMU or base missing from this report)"]
    d = models["dmu"]["mean_R@1"]
    n = models["dmu"].get("num_images", 0)
    # binomial standard error of a difference of two R@1s on n queries per direction, both directions averaged
    noise = 100 * 2 * math.sqrt(max(d * (1 - d), 1e-4) / max(2 * n, 1)) * math.sqrt(2)
    out = []
    for other in [m for m in models if m != "dmu"]:
        delta = 100 * (d - models[other]["mean_R@1"])
        if abs(delta) < 0.05:
            out.append(f"- DMU mean R@1 equals `{other}`'s.")
            continue
        word = "above" if delta > 0 else "below"
        flag = "" if abs(delta) >= noise else " (within noise)"
        out.append(f"- DMU mean R@1 is {abs(delta):.1f} points {word} `{other}`{flag}.")
    base = models["base"]["mean_R@1"]
    if base < 1:
        out.append(f"- DMU removes {100 * (d - base) / (1 - base):.0f}% of the base's R@1 error "
                   "(negative: it adds error).")
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
