"""Pre-train a small CLIP from scratch: how the shipped base checkpoint is made."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeclip import io
from moeclip.config import to_dict
from moeclip.eval.evaluate import evaluate, format_table
from moeclip.loader import save_model_dir
from moeclip.model.factory import build_dense, preprocess_for, tokenizer_for
from moeclip.pipeline.common import DataConfig, ensure_data, open_train_data
from moeclip.train.dist import DistributedConfig, make_runtime
from moeclip.train.loop import TrainConfig, require_finished, train
from moeclip.train.tracking import LoggingConfig, configure

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    arch: str = "moeclip-tiny"
    output_dir: str = "runs/pretrain"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # trackers, OUTPUT_DIR/logs/pretrain/


def run_pretrain(cfg: PretrainConfig) -> dict:
    runtime = make_runtime(cfg.distributed)
    configure(runtime.trainer, cfg.logging, cfg.output_dir)
    ensure_data(cfg.data, runtime.is_main)
    runtime.barrier()
    torch.manual_seed(cfg.seed)
    model = build_dense(cfg.arch)
    preprocess, tokenizer = preprocess_for(model), tokenizer_for(cfg.arch, model.moeclip_arch["model_cfg"])
    out = Path(cfg.output_dir)
    ds = open_train_data(cfg.data, preprocess)
    cfg.train.seed = cfg.seed
    result = train(model, ds, tokenizer, cfg.train, out / "train", runtime,
                   trainable=[n for n, _ in model.named_parameters()], desc="pretrain")
    require_finished(result, cfg.train, "pretrain")
    metrics = evaluate(model.eval(), preprocess, tokenizer, cfg.data.val, progress=False, runtime=runtime,
                       image_root=cfg.data.image_root)
    if runtime.is_main:
        save_model_dir(model, out / "model", extra={"trained_by": "recipes/pretrain.py", "config": to_dict(cfg),
                                                    "val_metrics": metrics})
        io.write_json(out / "metrics.json", {"val": metrics, "train": result})
        print(format_table(metrics))
    runtime.barrier()
    return metrics
