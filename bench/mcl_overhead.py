"""MCL overhead: a stage's embedding + clustering time against its training time, and k-means as N grows.

Stage timings come from an existing run (`runs/dmu/mcl/stage_*/stage.json`: `seconds.embed_and_cluster`
and `seconds.train`), with the k-means share re-timed on that stage's saved features; without a run,
one small stage is run on `runs/smoke-data` (or a freshly synthesised corpus). k-means is
`moeclip.mcl.cluster.kmeans` exactly as a stage calls it (k = 3 per modality, k-means++, n_init 3;
full KMeans up to 100k rows, MiniBatchKMeans batch 4096 above), on N x 512 float32 features drawn
around 9 centres (uniform noise), each N in a fresh process (time, CPU time, peak RSS). Feature generation is not timed.

    python bench/mcl_overhead.py [--quick] --out results.json
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, Timer, loadavg, peak_rss_mb, read_json, write_json  # noqa: E402


def cluster_module():
    """`moeclip.mcl.cluster` from this checkout (it imports moeclip.mcl.merge/store, so the package is needed;
    importing it costs a few seconds of torch import, outside the timed calls)."""
    sys.path.insert(0, str(REPO))
    import moeclip.mcl.cluster as module

    return module


def kmeans_one(n: int, dim: int, out: str) -> None:
    """Runs in its own process: generate, then time one `kmeans` call."""
    import numpy as np
    from threadpoolctl import threadpool_info

    kmeans = cluster_module().kmeans
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((9, dim), dtype=np.float32)
    feats = rng.random((n, dim), dtype=np.float32)  # uniform noise: 3x faster to draw than normal at 1M x 512
    feats -= 0.5
    for c in range(9):  # in place, in slices: no second N x dim array
        feats[c::9] += 0.3 * centres[c]
    rss_before = peak_rss_mb()
    with Timer() as t:
        got, cents = kmeans(feats, 3, seed=1)
    threads = sorted({i.get("num_threads") for i in threadpool_info()})
    write_json(out, {"n": n, "dim": dim, "k": 3, "seconds": t.wall, "cpu_seconds": t.cpu,
                     "algorithm": "MiniBatchKMeans (batch 4096)" if n > 100_000 else "KMeans",
                     "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss_before,
                     "features_mb": feats.nbytes / 2**20, "sklearn_threads": threads,
                     "cluster_sizes": np.bincount(got, minlength=3).tolist()})


def stage_timings() -> dict:
    import numpy as np

    kmeans = cluster_module().kmeans
    stages = sorted((REPO / "runs" / "dmu" / "mcl").glob("stage_*/stage.json"))
    if not stages:
        return measure_small_stage()
    rows = []
    for path in stages:
        info = read_json(path)
        feats = path.parent / "features"
        row = {"stage": info["stage"], "embed_and_cluster_s": info["seconds"]["embed_and_cluster"],
               "train_s": info["seconds"]["train"], "train_steps": info["train"]["steps"],
               "global_batch": info["config"]["train"]["global_batch"]}
        progress = feats / "progress.json"
        if progress.exists():
            meta = read_json(progress)
            f16 = meta.get("dtype") == "float16"
            img = np.memmap(feats / ("image.f16" if f16 else "image.f32"), dtype=np.float16 if f16 else np.float32,
                            mode="r", shape=(meta["num_images"], meta["dim"]))
            txt = np.memmap(feats / ("text.f16" if f16 else "text.f32"), dtype=np.float16 if f16 else np.float32,
                            mode="r", shape=(meta["num_captions"], meta["dim"]))
            k_img, k_txt = info["clusters"]["k_img"], info["clusters"]["k_txt"]
            with Timer() as t:
                kmeans(np.asarray(img), k_img, seed=1)
                kmeans(np.asarray(txt), k_txt, seed=2)
            row.update(kmeans_s=t.wall, num_images=meta["num_images"], num_captions=int(txt.shape[0]), dim=meta["dim"])
        rows.append(row)
    return {"source": f"{stages[0].parent.parent.relative_to(REPO)}/stage_*/stage.json (an existing run)", "stages": rows}


def measure_small_stage() -> dict:
    """No run on disk: one MCL stage (20 steps) of the base checkpoint on a small corpus."""
    import moeclip
    from moeclip.data.dataset import CaptionDataset
    from moeclip.train.mcl_stages import MCLConfig, run_mcl
    from moeclip.train.dist import make_runtime
    from moeclip.train.loop import TrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        table = REPO / "runs" / "smoke-data" / "train.csv"
        if not table.exists():
            subprocess.run([str(Path(sys.executable).parent / "moeclip"), "synth", "--out", f"{tmp}/data",
                            "--train", "512", "--val", "10"], check=True)
            table = Path(tmp) / "data" / "train.csv"
        model, preprocess, tokenizer = moeclip.load(str(REPO / "checkpoints" / "base-tiny"))
        ds = CaptionDataset(table, preprocess)
        cfg = MCLConfig(num_experts=2, train=TrainConfig(steps=20, global_batch=64, lr=1e-4, warmup_steps=2,
                                                         ckpt_every=1000))
        run_mcl(model, ds, tokenizer, cfg, Path(tmp) / "mcl", make_runtime())
        info = read_json(Path(tmp) / "mcl" / "stage_1" / "stage.json")
    return {"source": f"measured now: 1 stage, 20 steps x 64 on {table.name} ({len(ds.rows)} rows)",
            "stages": [{"stage": 1, "embed_and_cluster_s": info["seconds"]["embed_and_cluster"],
                        "train_s": info["seconds"]["train"], "train_steps": 20, "global_batch": 64}]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--kmeans-one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--small-stage", action="store_true", help="ignore runs/dmu and run one small stage")
    args = p.parse_args()
    if args.kmeans_one:
        return kmeans_one(args.kmeans_one, 512, args.out)
    result = {"load_before": loadavg()}
    result["stages"] = measure_small_stage() if args.small_stage else stage_timings()
    rows = []
    for n in ((10_000, 30_000) if args.quick else (10_000, 100_000, 1_000_000)):
        out = Path(args.out).with_suffix(f".kmeans{n}.json")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--kmeans-one", str(n), "--out", str(out)], check=True, cwd=REPO)
        row = read_json(out)
        row["process_seconds"] = time.perf_counter() - t0
        out.unlink()
        print(row, flush=True)
        rows.append(row)
    result.update(kmeans=rows, load_after=loadavg())
    write_json(args.out, result)


if __name__ == "__main__":
    main()
