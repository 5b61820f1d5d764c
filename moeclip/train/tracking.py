"""Training logs through accelerate's trackers: TensorBoard when it is installed, Weights & Biases when asked.

Each pipeline step (an MCL stage, the router fine-tuning, a baseline, the evaluations) gets its own run,
`OUTPUT_DIR/logs/<step>/` for TensorBoard (`tensorboard --logdir runs/dmu/logs`) and a run of that name in
the W&B project. Only rank 0 opens trackers; other ranks get a `StepLog` that drops everything. The JSON
histories the loop writes stay the record the report reads; trackers are for watching and comparing runs.
"""
from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, TensorBoardTracker, WandBTracker
from torch import nn

from moeclip.analysis.stats import last_routing_stats

log = logging.getLogger(__name__)


@dataclass
class LoggingConfig:
    """`logging:` in a recipe YAML."""
    tensorboard: bool = True   # event files when tensorboard is installed (pip install 'moeclip[tensorboard]')
    wandb: bool = False        # also log to W&B (pip install wandb; `wandb login`, or WANDB_MODE=offline)
    wandb_project: str = "moeclip"
    dir: str | None = None     # None = OUTPUT_DIR/logs
    router_stats: bool = True  # router entropy and expert load per MoE layer at every logged step


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def configure(trainer: Any, cfg: LoggingConfig, output_dir: str | Path) -> Path:
    """Attach the recipe's logging settings to the launch's Accelerator, where the loop and the evaluator find
    them; returns the log root."""
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise ValueError("logging.wandb=true but wandb is not installed: pip install wandb (or logging.wandb=false)")
    root = Path(cfg.dir) if cfg.dir else Path(output_dir) / "logs"
    trainer.moeclip_logging = (cfg, root)
    return root


def run_name(desc: str) -> str:
    """A step's description ('MCL stage 1', 'DMU router+experts') as a run directory name ('mcl_stage_1')."""
    return re.sub(r"[^a-z0-9]+", "_", desc.lower()).strip("_") or "run"


class StepLog:
    """The trackers of one pipeline step; `log` sends numbers (and strings) to every one of them."""

    def __init__(self, trackers: list[GeneralTracker] | None = None, config: LoggingConfig | None = None) -> None:
        self.trackers = trackers or []
        self.config = config or LoggingConfig(tensorboard=False)

    @property
    def active(self) -> bool:
        return bool(self.trackers)

    def log(self, values: dict[str, Any], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def open_step(trainer: Any, name: str) -> StepLog:
    """Trackers for pipeline step `name` on rank 0, as `configure` set them; an inactive StepLog elsewhere
    (other ranks, logging off, or a launch no recipe configured)."""
    settings = getattr(trainer, "moeclip_logging", None)
    if settings is None or not getattr(trainer, "is_main_process", True):
        return StepLog()
    cfg, root = settings
    trackers: list[GeneralTracker] = []
    if cfg.tensorboard:
        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            _warn_once("tensorboard", "tensorboard is not installed: no event files are written "
                       "(pip install 'moeclip[tensorboard]', or logging.tensorboard=false to silence this)")
        else:
            trackers.append(TensorBoardTracker(name, root))
    if cfg.wandb:
        trackers.append(WandBTracker(cfg.wandb_project, name=f"{root.parent.name}/{name}", group=root.parent.name,
                                     dir=str(root)))
    for tracker in trackers:
        getattr(tracker, "start", lambda: None)()  # accelerate < 1.2 starts trackers in __init__
    return StepLog(trackers, cfg)



# loop history keys -> tracker tags (grouped under train/ in TensorBoard)
_TAGS = {"loss": "train/loss", "clip_loss": "train/contrastive_loss", "lr": "train/lr",
         "samples_per_s": "train/samples_per_s"}


def train_values(entry: dict[str, float], model: nn.Module | None = None) -> dict[str, float]:
    """One history entry of the loop as tracker values; with `model`, also each MoE layer's router entropy
    and expert load over the real tokens of its last forward."""
    values = {}
    for k, v in entry.items():
        if k == "step":
            continue
        if k.startswith(("lb_", "z_")):
            kind, tower = k.split("_", 1)
            values[f"train/{'load_balancing' if kind == 'lb' else 'z'}_loss_{tower}"] = v
        else:
            values[_TAGS.get(k, f"train/{k}")] = v
    for layer, stats in (last_routing_stats(model) if model is not None else {}).items():
        values[f"router/{layer}/entropy_bits"] = stats["entropy_bits"]
        values.update({f"router/{layer}/load_e{i}": x for i, x in enumerate(stats["load"])})
    return values


def eval_values(name: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """A model's evaluation metrics as tracker values `<metric>/<model>` (so one chart group per metric
    compares the models), with the retrieval protocol as text."""
    values: dict[str, Any] = {f"{k}/{name}": v for k, v in metrics.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool) and "R@" in k}
    values.update({f"factor_{k}/{name}": v for k, v in metrics.get("factors", {}).items()})
    if "protocol" in metrics:
        values[f"protocol/{name}"] = metrics["protocol"]
    return values
