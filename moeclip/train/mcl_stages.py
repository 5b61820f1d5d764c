"""Multistage contrastive learning: stage s embeds the corpus with stage s-1's model, clusters,
accumulates the labels, and fine-tunes only the FFNs of a fresh copy of the base with every global
batch drawn from one accumulated group. Each stage leaves one FFN weight set: one expert.

The training application's side of MCL (`moeclip.mcl` holds the embedding pass and the clustering,
plain library code). Every step leaves a file that marks it done (features/progress.json, clusters.json, ffn.safetensors +
stage.json), so a re-run skips finished work and resumes a stage's training from its checkpoint.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from torch import nn

from moeclip import io
from moeclip.data.dataset import CaptionDataset
from moeclip.mcl.cluster import alignment, cluster_stage, group_sizes
from moeclip.mcl.embed import embed_corpus
from moeclip.config import ConfigError
from moeclip.model.ffn import ffn_digest, ffn_distance, ffn_param_names, ffn_state_dict, load_ffn_state_dict
from moeclip.runtime import Runtime
from moeclip.train.loop import TrainConfig, require_finished, train

log = logging.getLogger(__name__)


def _stage_train_default() -> TrainConfig:
    return TrainConfig(steps=300, lr=1e-4, weight_decay=0.2, warmup_steps=30, label_smoothing=0.1,
                       fixed_logit_scale=100.0, ckpt_every=100)


@dataclass
class MCLConfig:
    num_experts: int = 4                 # expert 0 is the base: num_experts - 1 stages
    k_img: int = 3
    k_txt: int = 3
    towers: list[str] = field(default_factory=lambda: ["visual", "text"])
    blocks: list[int] | None = None      # None = every block
    min_group: int | None = None         # merge groups below this size; None = one global batch
    embed_batch: int = 512
    train: TrainConfig = field(default_factory=_stage_train_default)
    # variants (defaults = the published recipe)
    cluster_features: Literal["separate", "joint"] = "separate"  # k-means per modality, or on [image, text]
    group_size: int | None = None        # choose k from N so groups average this size (k_img/k_txt ignored)
    accumulate: bool = True              # refine the previous stages' groups, or use this stage's alone
    project_out_previous: bool = False   # remove the previous stage's centroid directions before clustering
    start_from: Literal["base", "previous"] = "base"  # each stage restarts from the base FFNs, or continues
    # "stages": DMU's sequential MCL stages; "specialists": one k-means partition of the base's features per
    # expert, each trained on its own partition alone (moeclip.train.specialists; k_img/k_txt/group_size unused)
    construction: Literal["stages", "specialists"] = "stages"


def run_mcl(base: nn.Module, dataset: CaptionDataset, tokenizer: Callable, cfg: MCLConfig, out_dir: str | Path,
            runtime: Runtime, seed: int = 0,
            factor_columns: dict[str, list[str]] | None = None) -> list[dict[str, "torch.Tensor"]]:
    """Return the FFN weight sets of experts 0..N-1 (0 = base); writes out_dir/stage_{s}/."""
    out = Path(out_dir)
    names = ffn_param_names(base, cfg.towers, cfg.blocks)
    experts = [ffn_state_dict(base, cfg.towers, cfg.blocks)]
    _check_same_settings(out, cfg, seed, experts[0], len(dataset), runtime, base)
    if cfg.construction == "specialists":
        from moeclip.train.specialists import run_specialists
        return run_specialists(base, dataset, tokenizer, cfg, out, runtime, seed, factor_columns, _cluster)
    if cfg.construction != "stages":
        raise ConfigError(f"mcl.construction must be 'stages' or 'specialists', got {cfg.construction!r}")
    previous_groups = None
    for s in range(1, cfg.num_experts):
        sdir = out / f"stage_{s}"
        if (sdir / "stage.json").exists() and (sdir / "ffn.safetensors").exists():
            experts.append(io.load_tensors(sdir / "ffn.safetensors"))
            previous_groups = io.load_npy(sdir / "accumulated.npy")
            log.info("MCL stage %d: already done", s)
            continue
        t0 = time.time()
        groups, acc, clusters = _cluster(base, experts[-1], dataset, tokenizer, cfg, sdir, runtime, seed + s,
                                         previous_groups if cfg.accumulate else None, factor_columns,
                                         out / f"stage_{s - 1}" if s > 1 else None)
        previous_groups = acc
        t_cluster = time.time() - t0
        model = copy.deepcopy(base)
        if cfg.start_from == "previous":
            load_ffn_state_dict(model, experts[-1])
        tcfg = copy.deepcopy(cfg.train)
        tcfg.seed = seed + s
        result = train(model, dataset, tokenizer, tcfg, sdir / "train", runtime, trainable=names,
                       labels=groups, desc=f"MCL stage {s}")
        require_finished(result, tcfg, f"MCL stage {s}")
        ffn = ffn_state_dict(model, cfg.towers, cfg.blocks)
        del model
        experts.append(ffn)
        summary = {"stage": s, "config": asdict(cfg), "clusters": clusters, "train": result,
                   "seconds": {"embed_and_cluster": round(t_cluster, 2), "train": result["seconds"]},
                   "distance_to_experts": [round(ffn_distance(ffn, e), 5) for e in experts[:-1]]}
        if runtime.is_main:
            io.save_tensors(sdir / "ffn.safetensors", ffn, metadata={"stage": s})
            io.write_json(sdir / "stage.json", summary)
        runtime.barrier()
        log.info("MCL stage %d: %d groups (sizes %s...), distance to earlier experts %s", s,
                 clusters["num_groups"], clusters["group_sizes"][:5], summary["distance_to_experts"])
    return experts


# settings that do not change what a stage computes (num_experts only decides how many stages run)
_RESUME_IGNORES = {"num_experts", "embed_batch", "train.ckpt_every", "train.log_every", "train.num_workers",
                   "train.pin_memory", "train.prefetch_factor",
                   "train.stop_at"}


def _check_same_settings(out: Path, cfg: MCLConfig, seed: int, base_ffn: dict, samples: int,
                         runtime: Runtime, base: nn.Module | None = None) -> None:
    """Resume only stages the same settings made: otherwise a re-run with a changed config would silently
    mix stale experts into the new model. More or fewer stages (num_experts) may reuse the same directory."""
    flat = {f"config.{k}": v for k, v in _flatten(asdict(cfg)).items() if k not in _RESUME_IGNORES}
    if flat.get("config.construction") == "stages":
        del flat["config.construction"]  # the default, recorded only when not: older runs' stages still resume
    want = io.json_roundtrip({"seed": seed, "samples": samples, "base_ffn": ffn_digest(base_ffn), **flat,
                              **_stretch_setting(base)})
    path = out / "settings.json"
    if path.exists():
        have = io.read_json(path)
        for key in sorted(set(have) | set(want)):
            if have.get(key) != want.get(key):
                raise ConfigError(f"{out} holds MCL stages made with {key}={have.get(key)!r}, but this run has "
                                  f"{want.get(key)!r}; use a new output_dir= or mcl_dir= (or delete {out}) "
                                  "to start over")
    elif runtime.is_main:
        io.write_json(path, want)
    runtime.barrier()


def _stretch_setting(base: nn.Module) -> dict:
    """A base stretched to a longer text context (model.context_length) makes other stages than the same base
    unstretched, though its FFN digest is the same; recorded only when stretched, so older runs still resume."""
    arch = getattr(base, "moeclip_arch", {}) or {}
    if "stretched_from" not in arch:
        return {}
    return {"text_context_length": arch["model_cfg"]["text_cfg"]["context_length"]}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _cluster(base: nn.Module, prev_ffn: dict, dataset: CaptionDataset, tokenizer: Callable, cfg: MCLConfig,
             sdir: Path, runtime: Runtime, seed: int, previous: np.ndarray | None,
             factor_columns: dict[str, list[str]] | None,
             previous_dir: Path | None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Embed with the previous stage's model on every rank (sharded), cluster on rank 0 while the others wait
    (the runtime's collective timeout covers it), and every rank reads the result."""
    done = (sdir / "clusters.json").exists()
    runtime.barrier()  # every rank has looked before rank 0 may write it
    if not done:
        model = copy.deepcopy(base)
        load_ffn_state_dict(model, prev_ffn)
        features = embed_corpus(model, dataset, tokenizer, sdir / "features", runtime, cfg.embed_batch,
                                num_workers=cfg.train.num_workers)
        del model
    if not done and runtime.is_main:
        img, txt, ok = features
        min_group = cfg.min_group or cfg.train.global_batch
        k_img, k_txt = _ks(cfg, len(img))
        project = None
        if cfg.project_out_previous and previous_dir is not None:
            project = (io.load_npy(previous_dir / "image_centroids.npy"), io.load_npy(previous_dir / "text_centroids.npy"))
        c = cluster_stage(img, txt, previous, k_img, k_txt, min_group, seed, cfg.cluster_features, project)
        for name in ("image_labels", "text_labels", "joint", "accumulated", "groups",
                     "image_centroids", "text_centroids"):
            io.save_npy(sdir / f"{name}.npy", getattr(c, name))
        info = {"k_img": k_img, "k_txt": k_txt, "cluster_features": cfg.cluster_features, "num_joint": int(len(np.unique(c.joint))),
                "num_accumulated": int(c.accumulated.max() + 1), "num_groups": int(c.groups.max() + 1),
                "merged_small_groups": c.merges, "min_group": min_group,
                "group_sizes": group_sizes(c.groups), "unreadable_images": int((~ok).sum())}
        if factor_columns:
            info["nmi"] = {"image": alignment(c.image_labels, factor_columns),
                           "text": alignment(c.text_labels, factor_columns),
                           "groups": alignment(c.groups, factor_columns)}
        io.write_json(sdir / "clusters.json", info)
    runtime.barrier()
    return (io.load_npy(sdir / "groups.npy"), io.load_npy(sdir / "accumulated.npy"),
            io.read_json(sdir / "clusters.json"))


def _ks(cfg: MCLConfig, n: int) -> tuple[int, int]:
    """k per modality: as configured, or derived from a target mean group size."""
    if cfg.group_size is None:
        return cfg.k_img, cfg.k_txt
    groups = max(2, n // cfg.group_size)
    if cfg.cluster_features == "joint":
        return groups, 1
    k = max(2, round(groups ** 0.5))
    return k, k
