"""The DMU report's plots: loss curves of every training step, and the retrieval of each model stage by stage.

Drawn from what the pipeline already keeps (the loop's JSON histories, the cached evaluations), so a resumed
or re-rendered report draws the same pictures; the per-layer expert load is `moeclip.analysis`'s heatmap.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from moeclip.figures import figure, save_png

# the history keys the loop writes, and how the plot names them
LOSSES = {"clip_loss": "contrastive loss", "lb_visual": "load balancing (image)", "lb_text": "load balancing (text)"}
STAGE_METRICS = {"mean_R@1": "mean R@1", "image_to_text_R@1": "image→text R@1",
                 "text_to_image_R@1": "text→image R@1"}


def plot_losses(histories: dict[str, list[dict[str, float]]], path: Path) -> Path | None:
    """One panel per loss, one line per training step (x = that step's optimiser step); None without history."""
    shown = [k for k in LOSSES if any(k in e for h in histories.values() for e in h)]
    if not shown:
        return None
    fig = figure(4.2 * len(shown), 3.2)
    for i, key in enumerate(shown):
        ax = fig.add_subplot(1, len(shown), i + 1)
        for name, history in histories.items():
            points = [(e["step"], e[key]) for e in history if key in e]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=name)
        ax.set_title(LOSSES[key], fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    return save_png(fig, path)


def plot_stages(models: dict[str, dict[str, Any]], protocol: str, path: Path) -> Path:
    """Retrieval R@1 of every evaluated model in pipeline order (base, MCL stages, DMU, baselines), in %."""
    names = list(models)
    fig = figure(1.6 + 0.75 * len(names), 3.4)
    ax = fig.add_subplot()
    for key, label in STAGE_METRICS.items():
        ax.plot(range(len(names)), [100 * models[n].get(key, float("nan")) for n in names], marker="o", label=label)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("%", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(f"retrieval on the validation split by model ({protocol} protocol)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_png(fig, path)


def write_plots(out_dir: Path, models: dict[str, dict[str, Any]], histories: dict[str, list[dict[str, float]]],
                protocol: str) -> dict[str, str]:
    """OUT/plots/*.png; returns {name: path relative to OUT} for the report to link."""
    plots = Path(out_dir) / "plots"
    written = {"losses": plot_losses(histories, plots / "losses.png"),
               "stages": plot_stages(models, protocol, plots / "stages.png")}
    return {k: str(p.relative_to(out_dir)) for k, p in written.items() if p is not None}
