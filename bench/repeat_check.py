"""Does a model trained in a recipe depend on what the same process trained before it?

docs/results.md §1 found one seed's scores 0.3 apart between two runs that train the same model with the same
settings, one after other training in its process and one not. This trains the `dense_ft` baseline the way
recipes/dmu.py does (moeclip.pipeline.dmu's own steps, on a short budget) first in a fresh process, then again
after each kind of earlier work a recipe does (another dense fine-tuning, a Drop-Upcycling MoE fine-tuning, MCL's
corpus embedding and k-means, an evaluation pass, draws from the global RNG), and compares the weights bit for
bit. The JSON keeps the machine and commit beside the answer: a difference that shows up only across machines is
not an order effect.

    python bench/repeat_check.py [--steps 20] [--out docs/repeat_check.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from moeclip.config import parse_recipe_args
from moeclip.eval.evaluate import evaluate
from moeclip.mcl.cluster import kmeans
from moeclip.mcl.embed import embed_corpus
from moeclip.pipeline.common import ensure_data, environment, load_base, open_train_data
from moeclip.pipeline.constructions import construction_ft
from moeclip.pipeline.dmu import DMUConfig, _dense_ft_once, _finetune_once, _upcycled  # the recipe's own steps
from moeclip.train.dist import make_runtime
from moeclip.loader import load

REPO = Path(__file__).resolve().parent.parent


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in load(model_dir)[0].state_dict().items()}


def _compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float | int]:
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    return {"tensors_differing": len(differ),
            "max_abs_diff": max((float((a[k] - b[k]).abs().max()) for k in differ), default=0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="training steps of each model (default 20)")
    ap.add_argument("--config", default=str(REPO / "recipes" / "configs" / "default.yaml"))
    ap.add_argument("--out", default=None, help="JSON file for the answer (default: print only)")
    ap.add_argument("overrides", nargs="*", help="recipe key=value overrides (base=..., data.train=...)")
    args = ap.parse_args()
    cfg = parse_recipe_args(DMUConfig, args.overrides, Path(args.config), "")
    runtime = make_runtime(cfg.distributed)
    ensure_data(cfg.data, runtime.is_main)
    torch.manual_seed(cfg.seed)
    base, preprocess, tokenizer = load_base(cfg.base, cfg.model)
    ds = open_train_data(cfg.data, preprocess)
    budget = args.steps * cfg.mcl.train.global_batch
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        def dense(name: str, seed: int = cfg.seed) -> dict[str, torch.Tensor]:
            c = copy.deepcopy(cfg)
            c.seed = seed
            _dense_ft_once(base, ds, tokenizer, c, budget, Path(tmp) / name, runtime)
            return _weights(Path(tmp) / name / "model")

        def moe(name: str) -> None:
            d = Path(tmp) / name
            _finetune_once(lambda: _upcycled(base, None, cfg.mcl.num_experts, cfg, cfg.upcycle.drop_ratio), ds,
                           tokenizer, construction_ft(cfg, budget), d / "train", d / "model", runtime,
                           cfg.seed + 7, name, {})

        first = dense("first")
        checks = {"again": dense("again")}
        dense("other_dense", seed=cfg.seed + 7)
        checks["after_other_dense_ft"] = dense("after_other_dense")
        moe("moe")
        checks["after_drop_upcycling_ft"] = dense("after_moe")
        img, _, _ = embed_corpus(copy.deepcopy(base), ds, tokenizer, Path(tmp) / "features", runtime,
                                 cfg.mcl.embed_batch, num_workers=cfg.mcl.train.num_workers)
        k = max(2, len(img) // cfg.mcl.group_size) if cfg.mcl.group_size else cfg.mcl.k_img  # as MCL picks k
        kmeans(img.astype("float32"), k, cfg.seed)
        checks["after_mcl_embedding_and_kmeans"] = dense("after_mcl")
        evaluate(base, preprocess, tokenizer, cfg.data.val, batch_size=cfg.eval_batch, runtime=runtime,
                 progress=False, protocol=cfg.eval_protocol)
        checks["after_evaluation"] = dense("after_eval")
        torch.rand(12345)
        checks["after_global_rng_draws"] = dense("after_rng")
    result = {"steps": args.steps, "seconds": round(time.time() - started, 1),
              "same_as_first": {k: _compare(first, w) for k, w in checks.items()},
              "environment": environment(runtime)}
    result["order_matters"] = any(v["tensors_differing"] for v in result["same_as_first"].values())
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
