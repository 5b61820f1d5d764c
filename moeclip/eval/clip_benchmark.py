"""Evaluate moeclip models with LAION's CLIP_benchmark (`pip install 'moeclip[clip-benchmark]'`).

CLIP_benchmark loads models through `clip_benchmark.models.load_clip(model_type, model_name,
pretrained, cache_dir, device) -> (model, transform, tokenizer)`, dispatching on `model_type` through
its `TYPE2FUNC` table; its metrics only call `model.encode_image` / `model.encode_text` (under
autocast) and `tokenizer(list_of_str).to(device)`. `load_clip` below has that contract, `register()`
adds it as model type "moeclip", and `python -m moeclip.eval.clip_benchmark eval ...` runs
CLIP_benchmark's own command line with it registered:

    python -m moeclip.eval.clip_benchmark eval --model_type moeclip --model runs/dmu/model \
        --pretrained none --dataset mscoco_captions --dataset_root DIR --task zeroshot_retrieval --recall_k 1 5 10
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

MODEL_TYPE = "moeclip"
NO_PRETRAINED = ("", "none", "None", None)


def load_clip(model_type: str = MODEL_TYPE, model_name: str = "", pretrained: str | None = None,
              cache_dir: str | None = None, device: str | torch.device | None = None) -> tuple[nn.Module, Callable, Callable]:
    """CLIP_benchmark's loader contract: (model in eval mode on `device`, image transform, tokenizer).

    model_name: a moeclip model directory (dense or MoE), or an open_clip architecture name.
    pretrained: ignored for a model directory ('none' there); for an architecture, an open_clip tag or a
        weights file. cache_dir: unused (moeclip models are local folders; open_clip tags use the hub cache).
    """
    if model_type not in (MODEL_TYPE, "open_clip"):
        raise ValueError(f"model_type {model_type!r}: this loader serves '{MODEL_TYPE}'")
    from moeclip import load
    if not model_name:
        raise ValueError("model_name is empty; pass a moeclip model directory (--model runs/dmu/model)")
    if Path(model_name).is_dir():
        if pretrained not in NO_PRETRAINED:
            log.warning("%s is a moeclip model directory: pretrained=%r is ignored", model_name, pretrained)
        pretrained = None
    elif pretrained in NO_PRETRAINED:
        pretrained = None
    model, transform, tokenizer = load(model_name, pretrained=pretrained, device=device)
    return model.eval(), transform, tokenizer


def register() -> None:
    """Make `--model_type moeclip` known to an imported clip_benchmark (idempotent)."""
    try:
        import clip_benchmark.models as cb_models
    except ImportError:
        raise ImportError("clip_benchmark is not installed: pip install 'moeclip[clip-benchmark]'") from None
    cb_models.TYPE2FUNC[MODEL_TYPE] = _for_clip_benchmark
    if MODEL_TYPE not in cb_models.MODEL_TYPES:
        cb_models.MODEL_TYPES.append(MODEL_TYPE)  # the CLI's --model_type choices are this same list


def _for_clip_benchmark(model_name: str, pretrained: str | None, cache_dir: str | None,
                        device: str | torch.device) -> tuple[nn.Module, Callable, Callable]:
    """TYPE2FUNC entries are called with keyword arguments and no model_type."""
    return load_clip(MODEL_TYPE, model_name, pretrained, cache_dir, device)


def main(argv: list[str] | None = None) -> int:
    """CLIP_benchmark's own `clip_benchmark` command with model type 'moeclip' registered."""
    register()
    from clip_benchmark import cli
    sys.argv = ["clip_benchmark", *(sys.argv[1:] if argv is None else argv)]
    return cli.main() or 0


if __name__ == "__main__":
    sys.exit(main())
