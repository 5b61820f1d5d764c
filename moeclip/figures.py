"""Off-screen matplotlib figures for reports: the object API on an Agg canvas (no pyplot, no global backend
switch), so writing a report never opens a window nor changes the caller's matplotlib state."""
from __future__ import annotations

from pathlib import Path

from moeclip import io


def figure(width: float, height: float):
    """A matplotlib Figure of that size in inches, drawn on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: Path) -> Path:
    """Tight layout, written atomically (a reader never sees half a PNG)."""
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
