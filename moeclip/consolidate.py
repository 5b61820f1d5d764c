"""DeepSpeed checkpoint -> one moeclip model directory (`model.safetensors` + `config.json`).

A DeepSpeed MoE checkpoint keeps the dense weights in `mp_rank_00_model_states.pt` and every
expert of every layer in its own `layer_{L}_expert_{E}_mp_rank_00_model_states.pt`, under
DeepSpeed's names (`...mlp.experts.deepspeed_moe.experts.deepspeed_experts.{E}...`); DeepSpeed's
`zero_to_fp32` does not handle MoE. This puts the pieces back under moeclip's names
(`...mlp.experts.{E}...`) so `moeclip.load` reads the result on one process, without DeepSpeed.
Files are read with `torch.load(weights_only=True)`: no code from a checkpoint runs.

ZeRO stages 1 and 2 keep the full module weights in those files (in the training dtype), so no
optimizer shard is needed; ZeRO-3 checkpoints are not supported (nor is ZeRO-3 with native MoE).
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeclip.distributed import ANCHOR, CLIENT_KEY, DS_DIR
from moeclip.loader import load_model_dir, load_state_strict, save_model_dir

MAIN_FILE = "mp_rank_00_model_states.pt"
EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")
EXPERT_KEY = re.compile(r"^(.*)\.experts\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(.*)$")


def find_checkpoint(path: str | Path) -> Path:
    """The folder holding `mp_rank_00_model_states.pt`: accepts a loop checkpoint (`ckpt/step_N`),
    a DeepSpeed save dir (with `latest`, or a single tag inside) or the tag folder itself."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint folder not found")
    if (path / DS_DIR).is_dir():
        path = path / DS_DIR
    if (path / MAIN_FILE).exists():
        return path
    if (path / "latest").exists():
        tag = (path / "latest").read_text().strip()
        if (path / tag / MAIN_FILE).exists():
            return path / tag
    tags = [p.parent for p in path.glob(f"*/{MAIN_FILE}")]
    if len(tags) == 1:
        return tags[0]
    if list(path.glob("**/zero_pp_rank_*_model_states.pt")):
        raise ValueError(f"{path}: a ZeRO-3 checkpoint; only ZeRO stage 1/2 checkpoints can be consolidated")
    if len(tags) > 1:
        raise ValueError(f"{path}: several checkpoint tags ({', '.join(sorted(p.name for p in tags))}); "
                         "pass the one you want")
    raise FileNotFoundError(f"{path}: no DeepSpeed checkpoint ({MAIN_FILE}) found here")


def _load(path: Path) -> dict[str, Any]:
    try:
        with warnings.catch_warnings():  # DeepSpeed pickles with protocol 4; the safe unpickler reads it
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/unpickling errors come in many types
        raise ValueError(f"{path}: cannot read this checkpoint file safely ({e})") from None


def read_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict under moeclip's names, moeclip's metadata or {}) of a DeepSpeed checkpoint folder."""
    main = _load(folder / MAIN_FILE)
    if "module" not in main:
        raise ValueError(f"{folder / MAIN_FILE}: no 'module' weights in this file")
    meta = main.get(CLIENT_KEY) or {}
    real_experts = (meta.get("moe") or {}).get("num_experts")
    state = {k: v for k, v in main["module"].items() if k != ANCHOR}
    for file in sorted(folder.iterdir()):
        if not EXPERT_FILE.match(file.name):
            continue
        for key, value in _load(file).items():
            m = EXPERT_KEY.match(key)
            if m is None:
                raise ValueError(f"{file}: unexpected key '{key}' in an expert file")
            prefix, expert, rest = m.group(1), int(m.group(2)), m.group(3)
            if real_experts is not None and expert >= real_experts:
                continue  # an idle padding expert (ep_size did not divide the expert count)
            state[f"{prefix}.experts.{expert}.{rest}"] = value
    return state, meta


def consolidate(ckpt: str | Path, out_dir: str | Path, like: str | Path | None = None) -> Path:
    """Write the moeclip model directory of a DeepSpeed checkpoint; returns `out_dir`.

    like: a moeclip model directory with the same architecture, for checkpoints that moeclip's
        loop did not write (they lack the architecture record).
    """
    folder = find_checkpoint(ckpt)
    state, meta = read_checkpoint(folder)
    model = _skeleton(meta, like, folder)
    load_state_strict(model, state, folder, reshape_same_numel=True)
    return save_model_dir(model, out_dir, extra={"consolidated_from": str(folder)})


def _skeleton(meta: dict[str, Any], like: str | Path | None, folder: Path) -> nn.Module:
    if like is not None:
        return load_model_dir(like)
    if not meta.get("arch") or not meta.get("model_cfg"):
        raise ValueError(f"{folder}: the checkpoint does not record its architecture (not written by moeclip's "
                         "training loop); pass like=<a moeclip model directory of the same architecture>")
    from moeclip.model.factory import build_dense
    model = build_dense(meta["arch"], meta["model_cfg"])
    if meta.get("moe"):
        from moeclip.moe import build_moe
        build_moe(model, meta["moe"])
    return model


def add_command(sub: Any) -> None:
    """`moeclip consolidate CKPT_DIR OUT_DIR [--like MODEL_DIR]` (registered by moeclip.cli)."""
    c = sub.add_parser("consolidate", help="DeepSpeed (MoE) checkpoint -> one moeclip model directory",
                       description="Join a DeepSpeed checkpoint (dense weights + one file per expert) into "
                       "model.safetensors + config.json, loadable with moeclip.load on one process.")
    c.add_argument("checkpoint", help="a training checkpoint (out_dir/ckpt/step_N), a DeepSpeed save dir or tag dir")
    c.add_argument("out_dir", help="the model directory to write")
    c.add_argument("--like", default=None, help="a moeclip model directory of the same architecture, for "
                   "checkpoints written outside moeclip's training loop")
    c.set_defaults(func=_cmd_consolidate)


def _cmd_consolidate(args: Any) -> None:
    out = consolidate(args.checkpoint, args.out_dir, like=args.like)
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'} from {find_checkpoint(args.checkpoint)}")
