"""`analyse_experts` result -> experts.json, PNG heatmaps (`moeclip.figures`) and experts.md."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from moeclip import io
from moeclip.analysis.experts import MAX_PLOTTED_GROUPS
from moeclip.figures import figure, save_png


def _heatmap(ax, values: np.ndarray, rows: list[str], cols: list[str], vmax: float | None = None,
             annotate: bool = True):
    im = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=vmax if vmax else max(float(values.max()), 1e-9),
                   aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(cols)), cols, fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    if annotate and values.size <= 400:
        top = im.norm.vmax
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if v > 0.6 * top else "white")
    return im


def _experts(n: int) -> list[str]:
    return [f"e{i}" for i in range(n)]


def plot_load(layers: list[dict], tower: str, path: Path) -> Path:
    """Layer x expert share of routed slots; uniform routing is 1/E everywhere."""
    e = layers[0]["num_experts"]
    values = np.array([l["load"] for l in layers])
    fig = figure(1.2 + 0.7 * e, 1.3 + 0.45 * len(layers))
    ax = fig.add_subplot()
    im = _heatmap(ax, values, [f"block {l['block']}" for l in layers], _experts(e))
    fig.colorbar(im, ax=ax, fraction=0.05)
    ax.set_title(f"{tower}: share of routed slots (uniform {1 / e:.2f})", fontsize=9)
    ax.set_xlabel("expert", fontsize=8)
    return save_png(fig, path)


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return math.ceil(n / cols), cols


def plot_coselect(layers: list[dict], tower: str, path: Path) -> Path:
    """Per layer, the fraction of tokens that chose both expert i and j (diagonal: chose i)."""
    e = layers[0]["num_experts"]
    nr, nc = _grid(len(layers))
    fig = figure(0.6 + nc * (0.9 + 0.45 * e), 0.6 + nr * (0.7 + 0.45 * e))
    for k, l in enumerate(layers):
        ax = fig.add_subplot(nr, nc, k + 1)
        _heatmap(ax, np.array(l["coselect"]), _experts(e), _experts(e), vmax=1.0)
        ax.set_title(f"block {l['block']}", fontsize=8)
    fig.suptitle(f"{tower}: fraction of tokens routed to both experts (top-{layers[0]['top_k']})", fontsize=9)
    return save_png(fig, path)


def plot_groups(layers: list[dict], tower: str, groups: list[str], path: Path) -> Path:
    """Per layer, each group's expert shares (rows sum to 1), titled with MI(group; expert)."""
    e = layers[0]["num_experts"]
    tokens = np.array(layers[0]["groups"]["tokens"])
    shown = sorted(np.argsort(-tokens, kind="stable")[:MAX_PLOTTED_GROUPS].tolist())
    names = [groups[i][:18] for i in shown]
    nr, nc = _grid(len(layers))
    fig = figure(0.6 + nc * (1.6 + 0.5 * e), 0.7 + nr * (0.6 + 0.28 * len(shown)))
    for k, l in enumerate(layers):
        ax = fig.add_subplot(nr, nc, k + 1)
        share = np.array(l["groups"]["share"])[shown]
        _heatmap(ax, share, names if k % nc == 0 else [""] * len(shown), _experts(e), vmax=1.0,
                 annotate=len(shown) * e <= 120)
        g = l["groups"]
        ax.set_title(f"block {l['block']}: MI {g['mi_bits']:.3f} bits\n(norm {g['mi_norm']:.2f}, "
                     f"chance {g['mi_null_bits']:.3f})", fontsize=7)
    fig.suptitle(f"{tower}: expert share by group", fontsize=9)
    return save_png(fig, path)


def write_expert_report(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """experts.json, load_/coselect_/groups_{tower}.png and experts.md in `out_dir`; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": out / "experts.json"}
    io.write_json(written["json"], result)
    for tower in ("visual", "text"):
        layers = [l for l in result["layers"] if l["tower"] == tower]
        if not layers:
            continue
        written[f"load_{tower}"] = plot_load(layers, tower, out / f"load_{tower}.png")
        if layers[0]["top_k"] >= 2:
            written[f"coselect_{tower}"] = plot_coselect(layers, tower, out / f"coselect_{tower}.png")
        if result.get("group_by") and "groups" in layers[0]:
            written[f"groups_{tower}"] = plot_groups(layers, tower, result["groups"], out / f"groups_{tower}.png")
    written["markdown"] = out / "experts.md"
    io.write_text(written["markdown"], render_markdown(result, {k: p.name for k, p in written.items()}))
    return written


def render_markdown(result: dict[str, Any], images: dict[str, str]) -> str:
    e, k = result["num_experts"], result["top_k"]
    lines = ["# Expert usage", "",
             f"{result['data']}: {result['rows']} rows ({result['images'] or 0} images, {result['captions']} captions), "
             f"{e} experts, top-{k}; real tokens only. Load = share of routed slots (uniform {1 / e:.2f}); "
             f"entropy = mean per-token entropy of the router probabilities (max {math.log2(e):.2f} bits); "
             "CV = coefficient of variation of the load (0 = balanced).", ""]
    if result.get("skipped"):
        lines += [f"Skipped: {', '.join(f'{n} {r}' for r, n in result['skipped'].items())}.", ""]
    grouped = bool(result.get("group_by"))
    head = "| tower | block | load per expert | top-1 share | entropy (bits) | load CV |"
    if grouped:
        head += f" MI(`{result['group_by']}`; expert) bits | normalised | chance (p95) |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for l in result["layers"]:
        row = (f"| {l['tower']} | {l['block']} | {' / '.join(f'{x:.2f}' for x in l['load'])} | "
               f"{' / '.join(f'{x:.2f}' for x in l['top1'])} | {l['entropy_bits']:.3f} | {l['load_cv']:.3f} |")
        if grouped:
            g = l["groups"]
            row += f" {g['mi_bits']:.4f} | {g['mi_norm']:.3f} | {g['mi_null_bits']:.4f} ({g['mi_null_p95_bits']:.4f}) |"
        lines.append(row)
    if grouped:
        lines += ["", f"Groups of `{result['group_by']}`: {len(result['groups'])}. MI is over routed slots; "
                  f"chance = mean MI after shuffling the group labels over images/captions "
                  f"({result['null_permutations']} shuffles), so MI well above it means experts specialise by group."]
    lines.append("")
    for key, name in images.items():
        if key.endswith(("visual", "text")):
            lines += [f"![{key}]({name})", ""]
    return "\n".join(lines)
