"""Runs under `accelerate launch --config_file recipes/accelerate/ddp2.yaml` (2 CPU processes, plain DDP, gloo)
for test_ddp.py: sharded evaluation and embedding, then `train()` of each run in OUT/cfg.json. Each rank
writes OUT/rank{r}.json; rank 0 saves the trained models and the features. The test compares with one process.
"""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch.distributed as dist

from moeclip import load
from moeclip.data.dataset import CaptionDataset
from moeclip.eval.evaluate import evaluate
from moeclip.loader import save_model_dir
from moeclip.mcl.embed import embed_corpus
from moeclip.train.dist import finish, make_runtime
from moeclip.train.loop import TrainConfig, train

from moeclip.train.moe_finetune import moe_aux_loss
from two_ranks import trainable_names


def main() -> int:
    out = Path(sys.argv[1])
    cfg = json.loads((out / "cfg.json").read_text())
    runtime = make_runtime()
    result = {"world": runtime.world_size, "rank": runtime.rank, "backend": dist.get_backend(),
              "distributed_type": str(runtime.trainer.distributed_type), "device": str(runtime.device)}

    model, pre, tok = load(cfg["dense_dir"])
    result["eval"] = evaluate(model, pre, tok, cfg["val"], batch_size=8, runtime=runtime, progress=False)
    feats = embed_corpus(model, CaptionDataset(cfg["val"], pre), tok, out / "embed", runtime, batch_size=8,
                         commit_every=1)
    if runtime.is_main:
        np.savez(out / "features.npz", image=feats[0], text=feats[1], ok=feats[2])

    result["train"] = {}
    for run in cfg["runs"]:
        for stop_at in run.get("launches", [None]):  # [2, None]: stop after step 2, a new model resumes
            model, pre, tok = load(run["model_dir"])
            res = train(model, CaptionDataset(cfg["train"], pre), tok, TrainConfig(**{**run["train"], "stop_at": stop_at}),
                        out / run["name"], runtime, trainable=trainable_names(model, run["mode"]),
                        aux_loss=moe_aux_loss(run["lb_coef"], run["z_coef"]) if run["mode"] != "ffn" else None)
        result["train"][run["name"]] = {"steps": res["steps"], "backend": res["backend"]}
        if runtime.is_main:
            save_model_dir(model, out / f"{run['name']}_model")
        runtime.barrier()
    (out / f"rank{runtime.rank}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    finish(main())
