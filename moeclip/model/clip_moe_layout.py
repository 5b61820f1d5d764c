"""The CLIP-MoE authors' checkpoint layout (`clip-moe-4-2-sharegpt4v.pt`), read into and written from moeclip.

Their files are plain torch state dicts in OpenAI-CLIP naming, so every dense weight keeps its name in an
open_clip CLIP; only three things differ:
- an MoE block holds `...resblocks.{i}.gate.weight` and `...resblocks.{i}.experts.{e}.c_fc/c_proj` where
  moeclip has `...resblocks.{i}.mlp.router.proj.weight` and `...resblocks.{i}.mlp.experts.{e}....`;
- the 248-token text input adds `positional_embedding * m1 + positional_embedding_res * m2` (m1 keeps the first
  20 positions, m2 the rest, Long-CLIP style): one open_clip embedding made of rows 0-19 of the first and
  rows 20+ of the second computes the same thing;
- top-k is not stored (the released files are top-2).
Everything else (widths, layers, patch and image size, context, vocabulary, experts, which blocks are MoE)
follows from the shapes. The activation is QuickGELU and heads = width // 64 in both towers.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ARCH = "clip-moe"
FORMAT = "clip-moe"
DEFAULT_TOP_K = 2
HEAD_WIDTH = 64
SHORT_POSITIONS = 20  # positions taken from `positional_embedding`; the rest come from `positional_embedding_res`
OPENAI_VOCAB = 49408
TOWER_PREFIXES = {"visual": "visual.transformer.resblocks", "text": "transformer.resblocks"}
IGNORED_KEYS = ("input_resolution", "context_length", "vocab_size")  # scalars some OpenAI-layout files carry

_GATE = re.compile(r"^(.*resblocks\.\d+)\.gate\.weight$")
_EXPERT = re.compile(r"^(.*resblocks\.\d+)\.experts\.(\d+\..*)$")
_ROUTER = re.compile(r"^(.*resblocks\.\d+)\.mlp\.router\.proj\.weight$")
_MOE_EXPERT = re.compile(r"^(.*resblocks\.\d+)\.mlp\.experts\.(\d+\..*)$")

log = logging.getLogger(__name__)


@dataclass
class LayoutSpec:
    """What a CLIP-MoE file's shapes say about its architecture."""

    embed_dim: int
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_mlp_ratio: float
    text_width: int
    text_layers: int
    text_mlp_ratio: float
    context_length: int
    vocab_size: int
    num_experts: int
    moe_layers: dict[str, list[int]]  # tower -> MoE block indices

    def model_cfg(self) -> dict[str, Any]:
        """The open_clip CLIP config that computes what the authors' model computes."""
        return {
            "embed_dim": self.embed_dim,
            "quick_gelu": True,
            "vision_cfg": {"image_size": self.image_size, "layers": self.vision_layers, "width": self.vision_width,
                           "head_width": HEAD_WIDTH, "mlp_ratio": self.vision_mlp_ratio,
                           "patch_size": self.patch_size},
            "text_cfg": {"context_length": self.context_length, "vocab_size": self.vocab_size,
                         "width": self.text_width, "heads": self.text_width // HEAD_WIDTH,
                         "layers": self.text_layers, "mlp_ratio": self.text_mlp_ratio},
        }


# ---------------------------------------------------------------------------------------------- reading

def read_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A torch state dict read with weights_only=True (no code from the file runs), memory-mapped when possible."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # files in torch's legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise ValueError(f"{path}: cannot read this file as a plain torch state dict ({e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items() if k not in IGNORED_KEYS}


def _need(state: dict[str, torch.Tensor], key: str, ndim: int, where: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"{where}: no '{key}'; not a CLIP-MoE checkpoint in OpenAI-CLIP layout")
    if state[key].ndim != ndim:
        raise ValueError(f"{where}: '{key}' has shape {tuple(state[key].shape)}, expected {ndim} dimensions")
    return state[key]


def _blocks(state: dict[str, torch.Tensor], prefix: str, where: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.attn\.in_proj_weight$")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    if not found:
        raise ValueError(f"{where}: no '{prefix}.0.attn.in_proj_weight'; not a CLIP-MoE checkpoint")
    if found != set(range(len(found))):
        gap = min(set(range(max(found) + 1)) - found)
        raise ValueError(f"{where}: no '{prefix}.{gap}.attn.in_proj_weight' although block {max(found)} exists")
    return len(found)


def _hidden(state: dict[str, torch.Tensor], prefix: str, width: int, where: str) -> float:
    key = f"{prefix}.0.mlp.c_fc.weight"
    if key not in state:
        key = f"{prefix}.0.experts.0.c_fc.weight"
    hidden = _need(state, key, 2, where).shape[0]
    return hidden / width


def infer_spec(state: dict[str, torch.Tensor], where: str | os.PathLike = "checkpoint") -> LayoutSpec:
    """The architecture of a CLIP-MoE state dict, from its shapes; errors name the key that does not fit."""
    where = str(where)
    conv = _need(state, "visual.conv1.weight", 4, where)
    vis_pos = _need(state, "visual.positional_embedding", 2, where)
    text_pos = _need(state, "positional_embedding", 2, where)
    _need(state, "positional_embedding_res", 2, where)
    vision_width, patch = conv.shape[0], conv.shape[-1]
    grid = round((vis_pos.shape[0] - 1) ** 0.5)
    if grid * grid + 1 != vis_pos.shape[0]:
        raise ValueError(f"{where}: 'visual.positional_embedding' has {vis_pos.shape[0]} rows, not a square "
                         "grid of patches plus a class token")
    text_width = _need(state, "ln_final.weight", 1, where).shape[0]
    for key, width in (("visual.conv1.weight", vision_width), ("ln_final.weight", text_width)):
        if width % HEAD_WIDTH:
            raise ValueError(f"{where}: '{key}' gives width {width}; the layout has width // {HEAD_WIDTH} heads, "
                             f"so the width must be a multiple of {HEAD_WIDTH}")
    vocab = _need(state, "token_embedding.weight", 2, where).shape[0]
    if vocab != OPENAI_VOCAB:
        log.warning("%s: vocabulary of %d tokens; moeclip's tokenizer is OpenAI's BPE (%d tokens)",
                    where, vocab, OPENAI_VOCAB)

    moe: dict[str, list[int]] = {}
    experts: dict[int, str] = {}
    for tower, prefix in TOWER_PREFIXES.items():
        moe[tower] = sorted(int(k[len(prefix) + 1:].split(".")[0]) for k in state
                            if k.startswith(prefix + ".") and _GATE.match(k))
        for i in moe[tower]:
            experts.setdefault(state[f"{prefix}.{i}.gate.weight"].shape[0], f"{prefix}.{i}.gate.weight")
    if not experts:
        raise ValueError(f"{where}: no '...resblocks.N.gate.weight'; not a CLIP-MoE checkpoint (for a dense "
                         "OpenAI-layout file use moeclip.load(ARCH, pretrained=FILE))")
    if len(experts) > 1:
        raise ValueError(f"{where}: gates disagree on the number of experts "
                         f"({', '.join(f'{k!r} has {n}' for n, k in sorted(experts.items()))})")
    return LayoutSpec(
        embed_dim=_need(state, "text_projection", 2, where).shape[1],
        image_size=patch * grid, patch_size=patch, vision_width=vision_width,
        vision_layers=_blocks(state, TOWER_PREFIXES["visual"], where),
        vision_mlp_ratio=_hidden(state, TOWER_PREFIXES["visual"], vision_width, where),
        text_width=text_width, text_layers=_blocks(state, TOWER_PREFIXES["text"], where),
        text_mlp_ratio=_hidden(state, TOWER_PREFIXES["text"], text_width, where),
        context_length=text_pos.shape[0], vocab_size=vocab, num_experts=next(iter(experts)), moe_layers=moe,
    )


# ---------------------------------------------------------------------------------------------- names

def to_file_key(key: str) -> str:
    """moeclip state-dict name -> the authors' name (positional_embedding aside)."""
    if m := _ROUTER.match(key):
        return f"{m.group(1)}.gate.weight"
    if m := _MOE_EXPERT.match(key):
        return f"{m.group(1)}.experts.{m.group(2)}"
    return key


def _split_positions(context: int) -> int:
    return min(SHORT_POSITIONS, context)


def to_model_state(state: dict[str, torch.Tensor], model: nn.Module, where: str) -> dict[str, torch.Tensor]:
    """The file's tensors under the model's names; every key of either side must match, with its shape."""
    own = model.state_dict()
    expected = {to_file_key(k): k for k in own}
    expected["positional_embedding_res"] = "positional_embedding"
    for file_key, model_key in expected.items():
        if file_key not in state:
            raise ValueError(f"{where}: no '{file_key}' (the shapes of the other weights call for it)")
        if tuple(state[file_key].shape) != tuple(own[model_key].shape):
            raise ValueError(f"{where}: '{file_key}' has shape {tuple(state[file_key].shape)}, expected "
                             f"{tuple(own[model_key].shape)} from the shapes of the other weights")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"{where}: unexpected key '{unexpected[0]}' ({len(unexpected)} in all) for the CLIP-MoE "
                         "layout")
    out = {model_key: state[file_key] for file_key, model_key in expected.items()
           if file_key != "positional_embedding_res"}
    split = _split_positions(state["positional_embedding"].shape[0])
    out["positional_embedding"] = torch.cat([state["positional_embedding"][:split],
                                             state["positional_embedding_res"][split:]])
    return out


# ---------------------------------------------------------------------------------------------- loading

def build_from_spec(spec: LayoutSpec, top_k: int = DEFAULT_TOP_K) -> nn.Module:
    """A random-weight moeclip MoE CLIP with the architecture of `spec`."""
    from moeclip.model.factory import build_dense
    from moeclip.moe import build_moe
    model = build_dense(ARCH, spec.model_cfg())
    return build_moe(model, {"num_experts": spec.num_experts, "top_k": top_k, "jitter": 0.0,
                             "layers": spec.moe_layers})


def load_clip_moe(path: str | os.PathLike, top_k: int | None = None,
                  device: str | torch.device | None = None) -> nn.Module:
    """A CLIP-MoE checkpoint as an open_clip CLIP with moeclip MoE layers (router = gate, experts = experts)."""
    top_k = DEFAULT_TOP_K if top_k is None else top_k
    state = read_state(path)
    spec = infer_spec(state, path)
    if not 1 <= top_k <= spec.num_experts:
        raise ValueError(f"{path}: top_k={top_k} but the file has {spec.num_experts} experts per MoE layer")
    model = build_from_spec(spec, top_k)
    weights = to_model_state(state, model, str(path))
    own = model.state_dict()
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()}, strict=True)
    return model.to(device) if device is not None else model


# ---------------------------------------------------------------------------------------------- writing

_IGNORED_CFG_FIELDS = {"patch_dropout", "output_tokens", "hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs",
                       "pad_id", "eos_id"}  # no effect on what an eval-mode model computes with argmax pooling


def check_family(model: nn.Module) -> None:
    """Fail unless `model` computes what the authors' CLIP-MoE code would compute from its exported weights."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from moeclip.moe import moe_config, moe_layers
    if type(model) is not CLIP:
        raise ValueError(f"a {type(model).__name__} is not an OpenAI-style CLIP; only those export to clip-moe")
    cfg = model.moeclip_arch["model_cfg"]
    if not cfg.get("quick_gelu"):
        raise ValueError("the model uses nn.GELU; the CLIP-MoE layout is QuickGELU only")
    if not moe_layers(model):
        raise ValueError("the model has no MoE layers; the CLIP-MoE layout holds an MoE CLIP")
    if moe_config(model).get("shared_expert"):  # also: one (num_experts, top_k) for all layers, or a clear error
        raise ValueError("the model has a shared expert; the CLIP-MoE layout has routed experts only")
    state = {to_file_key(k): v for k, v in model.state_dict().items()}
    state["positional_embedding_res"] = state["positional_embedding"]
    spec = infer_spec(state, "the model")
    canonical = spec.model_cfg()
    for part, cls in (("vision_cfg", CLIPVisionCfg), ("text_cfg", CLIPTextCfg)):
        have, want = (dataclasses.asdict(cls(**c[part])) for c in (cfg, canonical))
        for field in have:
            if field not in _IGNORED_CFG_FIELDS and have[field] != want[field]:
                raise ValueError(f"model_cfg.{part}.{field} is {have[field]!r}; the CLIP-MoE layout needs "
                                 f"{want[field]!r}")
    for tower, blocks in spec.moe_layers.items():
        n_layers = spec.vision_layers if tower == "visual" else spec.text_layers
        if not blocks or blocks != list(range(n_layers - len(blocks), n_layers)):
            raise ValueError(f"{tower} MoE blocks are {blocks}; the CLIP-MoE layout has MoE in the last blocks "
                             "of both towers")
    n_vis, n_txt = len(spec.moe_layers["visual"]), len(spec.moe_layers["text"])
    # the authors' code takes one MoE depth M for both towers, capped at each tower's depth
    if n_vis != n_txt and not (n_vis < n_txt == spec.text_layers or n_txt < n_vis == spec.vision_layers):
        raise ValueError(f"{n_vis} image and {n_txt} text MoE blocks: the CLIP-MoE layout has min(M, layers) per tower")
    if spec.context_length != 248:
        raise ValueError(f"context length {spec.context_length}; the authors' code is fixed at 248 text positions")


def export_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the authors' names; both positional tables = the model's (the masks pick rows)."""
    check_family(model)
    state = {to_file_key(k): v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    state["positional_embedding_res"] = state["positional_embedding"].clone()
    return state


def export_clip_moe(model: nn.Module, out: str | os.PathLike) -> Path:
    """Write `model` as a CLIP-MoE checkpoint file, atomically (a reader never sees half a file)."""
    from moeclip import io
    state = export_state(model)
    out = Path(out)
    with io.atomic_path(out) as tmp:
        torch.save(state, tmp)
    return out


# ---------------------------------------------------------------------------------------------- command line

def add_commands(sub: Any) -> None:
    """`moeclip convert FILE.pt OUT_DIR` and `moeclip export --format clip-moe MODEL_DIR OUT.pt` (from moeclip.cli)."""
    c = sub.add_parser("convert", help="CLIP-MoE checkpoint (.pt, the authors' layout) -> moeclip model directory",
                       description="Read a CLIP-MoE release (e.g. clip-moe-4-2-sharegpt4v.pt) and write "
                       "model.safetensors + config.json, loadable with moeclip.load.")
    c.add_argument("checkpoint", help="the .pt file")
    c.add_argument("out_dir", help="the model directory to write")
    c.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                   help=f"experts per token; the file does not store it (default {DEFAULT_TOP_K})")
    c.set_defaults(func=_cmd_convert)

    e = sub.add_parser("export", help="moeclip MoE model -> a checkpoint in another layout, or a dense CLIP",
                       description="--format clip-moe: write a moeclip MoE model in the CLIP-MoE authors' layout "
                       "(QuickGELU CLIP with MoE in the last blocks of both towers, 248 text positions). "
                       "--dense: merge every MoE layer's experts into one FFN (a dense model directory of the "
                       "base's size), comparing retrieval on --data with the MoE's.")
    how = e.add_mutually_exclusive_group(required=True)
    how.add_argument("--format", choices=[FORMAT], help="target layout")
    how.add_argument("--dense", action="store_true", help="merge the experts into a dense moeclip model directory")
    e.add_argument("model", help="moeclip model directory")
    e.add_argument("out", help="the .pt file to write (--format), or the model directory (--dense)")
    e.add_argument("--method", default="auto", choices=["auto", "load", "mean"],
                   help="--dense: load = router-load-weighted average of the experts, mean = plain average, "
                   "auto = both, keeping the one with the higher mean R@1 on --data (default)")
    from moeclip.compress import add_measure_arguments
    add_measure_arguments(e, required=False)
    e.set_defaults(func=_cmd_export)


def _cmd_convert(args: Any) -> None:
    from moeclip.loader import save_model_dir
    model = load_clip_moe(args.checkpoint, top_k=args.top_k)
    out = save_model_dir(model, args.out_dir, extra={"converted_from": str(args.checkpoint),
                                                     "source_format": FORMAT})
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'} from {args.checkpoint} (top-{args.top_k})")


def _cmd_export(args: Any) -> None:
    if args.dense:
        from moeclip.compress import cmd_export_dense
        return cmd_export_dense(args)
    from moeclip.loader import load_model_dir
    out = export_clip_moe(load_model_dir(args.model), args.out)
    print(f"wrote {out} ({args.format} layout)")
