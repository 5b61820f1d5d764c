"""Config pieces and set-up steps shared by the recipes."""
from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass, field
from typing import Any, Callable, Literal
from pathlib import Path

from torch import nn

from moeclip.data.synth import SynthSpec, write_corpus
from moeclip.runtime import Runtime

log = logging.getLogger(__name__)


def environment(runtime: Runtime) -> dict[str, Any]:
    """The machine, library versions and code revision a report's numbers came from (report.json
    `environment`): a run repeats to the last digit on one machine; when one does not repeat another day's,
    this is what to compare first."""
    import moeclip
    info = {**runtime.describe(), "moeclip": moeclip.__version__}
    root = Path(moeclip.__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return info
    if rev.returncode == 0:
        info["commit"] = rev.stdout.strip()
        info["uncommitted_changes"] = bool(dirty.stdout.strip())
    return info


@dataclass
class SynthConfig:
    """Generate the corpus when `data.train` is missing (the shipped default does this)."""
    enabled: bool = True
    out: str = "data/synth"
    train: int = 20000
    val: int = 2000
    seed: int = 0
    preset: str = "default"
    format: Literal["csv", "wds"] = "csv"  # csv: PNG files + train.csv/val.csv; wds: webdataset shards (train-NNNNNN.tar ...)
    shard_size: int = 1000   # samples per shard (format wds)


@dataclass
class DataConfig:
    """train/val: CSV/TSV tables, ShareGPT4V caption JSON, webdataset shards ('dir/{000000..000099}.tar'), or
    (val) Karpathy-split JSON."""
    train: str = "data/synth/train.csv"
    val: str = "data/synth/val.csv"
    # folder relative image paths start from, for train and val (None = each data file's own folder)
    image_root: str | None = None
    cache_mb: float = 1024  # transformed training images kept in memory per process (0 = decode every time)
    # DataLoader workers of the evaluation passes (each training step has its own `train.num_workers`, which
    # MCL's embedding pass also uses); batches are pinned on a GPU
    workers: int = 0
    # more validation files every model is also evaluated on (name: path), e.g. `data.also_val.old=...` for the
    # old domain after adapting to a new one (retention); reported per model beside the main validation set
    also_val: dict[str, str] = field(default_factory=dict)
    synth: SynthConfig = field(default_factory=SynthConfig)


@dataclass
class ModelConfig:
    """What to change in the base model right after loading it, before any step uses it."""
    # stretch the text tower to this many positions, Long-CLIP style (e.g. 248 for ShareGPT4V's long captions);
    # None = the base's own context. The tokenizer and every saved model follow (moeclip.model.context)
    context_length: int | None = None


def load_base(name: str, model_cfg: ModelConfig, top_k: int | None = None) -> tuple[nn.Module, Callable, Callable]:
    """(model, preprocess, tokenizer) of a recipe's base, stretched when `model.context_length` asks for it, so
    every later step (MCL, fine-tuning, baselines, evaluation, analysis) sees one model shape and one tokenizer."""
    from moeclip.loader import load
    from moeclip.model.context import stretch_context
    from moeclip.model.factory import model_tokenizer
    model, preprocess, tokenizer = load(name, top_k=top_k)
    if model_cfg.context_length is not None:
        stretch_context(model, model_cfg.context_length)
        tokenizer = model_tokenizer(model)
    return model, preprocess, tokenizer


def open_train_data(data: DataConfig, preprocess: Callable):
    """The training dataset, any supported format (a Karpathy file trains on its `train` split)."""
    from moeclip.data.formats import open_dataset
    return open_dataset(data.train, preprocess, split="train", image_root=data.image_root, cache_mb=data.cache_mb)


def ensure_data(data: DataConfig, is_main: bool = True) -> None:
    """Write the synthetic corpus if the configured tables are absent and synth is enabled."""
    from moeclip.data.formats import data_exists
    for name, path in data.also_val.items():
        if not data_exists(path):
            raise FileNotFoundError(f"data.also_val.{name} '{path}' not found; point it at an existing validation "
                                    "file (e.g. the old domain's, written by its own run or `moeclip synth`)")
    if data_exists(data.train) and data_exists(data.val):
        return
    if not data.synth.enabled:
        raise FileNotFoundError(f"data.train '{data.train}' or data.val '{data.val}' not found; point them at your "
                                "CSV/TSV tables or shards, or set data.synth.enabled=true to generate the synthetic "
                                "corpus")
    if is_main:
        log.info("writing synthetic corpus to %s", data.synth.out)
        paths = write_corpus(data.synth.out, SynthSpec(train=data.synth.train, val=data.synth.val,
                                                       seed=data.synth.seed, preset=data.synth.preset),
                             format=data.synth.format, shard_size=data.synth.shard_size)
        if Path(data.train) != paths["train"] or Path(data.val) != paths["val"]:
            raise FileNotFoundError(f"synthetic corpus written to {data.synth.out}, but data.train/data.val point to "
                                    f"'{data.train}' / '{data.val}'; make them agree")


def setup_logging(is_main: bool = True) -> None:
    """moeclip's own progress at INFO on the main process; other libraries only warn."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("moeclip").setLevel(logging.INFO if is_main else logging.WARNING)


def run_guarded(main: Callable[[], object]) -> None:
    """Run a recipe; a user error ends it with one line and exit code 2, any crash with exit code 1.

    Set MOECLIP_DEBUG=1 for the full traceback. The exit goes through `finish`, so a launched
    multi-process job never hangs or aborts at interpreter exit.
    """
    import os
    import sys
    import traceback

    from moeclip.config import ConfigError
    from moeclip.data.dataset import DataError
    from moeclip.train.dist import finish
    from moeclip.train.loop import StoppedEarly
    try:
        main()
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed; no traceback
        finish(e.code if isinstance(e.code, int) else 1)
        return
    except StoppedEarly as e:  # train.stop_at: a checkpoint, not a finished step
        print(str(e), file=sys.stderr)
        finish(0)
        return
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        if os.environ.get("MOECLIP_DEBUG"):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        finish(2)
    except BaseException as e:  # a bug or a failing rank: show it, and take the other ranks down with us
        traceback.print_exc()
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        finish(1)
    finish(0)
