"""MCL bookkeeping at corpus scale: 3 stages of clustering + accumulation + merging, then one sampler epoch.

The default recipe's clustering: `cluster_features: joint`, k = N / 256 (`mcl_stages._ks` with group_size
256); min group = one global batch of 1,024 (the shipped default trains with 128 on 20,000 pairs; 1,024 is a
corpus-scale batch and merges more). The rows k-means and the merge read are normalised as they are read
(`store.Normalised`, as `cluster_stage` does), so their times include it. Features are synthetic, ViT-B sized
(512-d per modality): a mixture of 2,000 Gaussians on the sphere shared by the two modalities (a pair's image
and caption come from the same latent cluster, each with its own noise), generated chunkwise into float16
memmaps (the embedding store's format), with fresh noise per stage (stage s embeds with a different model).
Generation is not timed. Each step is timed (wall and CPU) and its peak resident memory is measured by
resetting the kernel's high-water mark before it (/proc/self/clear_refs, VmHWM); memmapped pages count while
resident.

    python bench/mcl_scale.py --pairs 100000 [--dim 512] [--stages 3] [--global-batch 1024] [--out x.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moeclip.data.sampler import GroupBatchSampler  # noqa: E402
from moeclip.mcl.cluster import accumulate, kmeans, kmeans_path, merge_stage  # noqa: E402
from moeclip.mcl.store import Normalised, chunks, l2, open_memmap  # noqa: E402

LATENT = 2_000


def synth(folder: Path, n: int, dim: int, stage: int) -> tuple[np.memmap, np.memmap]:
    """Image and text float16 memmaps: latent cluster z per pair (fixed), centres per modality (fixed),
    noise per stage."""
    rng = np.random.default_rng(0)
    z = rng.integers(0, LATENT, n)
    centres = [l2(rng.standard_normal((LATENT, dim), dtype=np.float32)) for _ in range(2)]
    out = []
    for m, name in enumerate(("image", "text")):
        mm = open_memmap(folder / f"{name}.f16", n, dim, "w+")
        noise = np.random.default_rng([stage, m])
        for sl in chunks(n):
            x = centres[m][z[sl]] + 0.9 / np.sqrt(dim) * noise.standard_normal((sl.stop - sl.start, dim),
                                                                                  dtype=np.float32)
            mm[sl] = l2(x)
        mm.flush()
        out.append(open_memmap(folder / f"{name}.f16", n, dim, "r"))
    return out[0], out[1]


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(rows: list[dict], stage: int, step: str, fn, *args, **kw):
    _reset_peak()
    w, c = time.perf_counter(), time.process_time()
    result = fn(*args, **kw)
    rows.append({"stage": stage, "step": step, "seconds": round(time.perf_counter() - w, 2),
                 "cpu_seconds": round(time.process_time() - c, 2), "peak_gb": round(_peak_gb(), 3)})
    print(f"  stage {stage} {step:<10} {rows[-1]['seconds']:8.1f} s  peak {rows[-1]['peak_gb']:.2f} GB", flush=True)
    return result


def run(pairs: int, dim: int, stages: int, global_batch: int, group_size: int, seed: int) -> dict:
    k = max(2, pairs // group_size)
    rows: list[dict] = []
    info: list[dict] = []
    acc = groups = None
    with tempfile.TemporaryDirectory(prefix="mcl_scale_") as tmp:
        for s in range(1, stages + 1):
            img, txt = synth(Path(tmp), pairs, dim, s)
            both = Normalised([img, txt])   # rows normalised when read: the k-means and merge times include it
            joint, _ = timed(rows, s, "kmeans", kmeans, both, k, seed + s)
            new_acc = timed(rows, s, "accumulate", accumulate, acc, joint)
            groups, merges = timed(rows, s, "merge", merge_stage, new_acc, both, global_batch, groups)
            acc = new_acc
            sizes = np.bincount(groups)
            info.append({"stage": s, "k": k, "kmeans_path": kmeans_path(pairs, k),
                         "clusters": int(len(np.unique(joint))),
                         "accumulated_groups": int(acc.max() + 1), "merges": merges,
                         "groups": int(len(sizes)), "smallest_group": int(sizes.min())})
            print(f"  stage {s}: {info[-1]}", flush=True)
            del both, img, txt
        sampler = GroupBatchSampler(groups, pairs, global_batch, seed=seed)
        batches = timed(rows, stages, "sampler", sampler.global_batches, 0)
        covered = bool(np.bincount(batches.reshape(-1), minlength=pairs).min() >= 1)
        info.append({"sampler_steps": int(len(batches)), "covers_every_sample": covered})
    return {"pairs": pairs, "dim": dim, "stages": stages, "global_batch": global_batch, "k": k, "steps": rows,
            "stage_info": info, "total_seconds": round(sum(r["seconds"] for r in rows), 1),
            "peak_gb": max(r["peak_gb"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, required=True)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--global-batch", type=int, default=1024)
    ap.add_argument("--group-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    a = ap.parse_args()
    res = run(a.pairs, a.dim, a.stages, a.global_batch, a.group_size, a.seed)
    print(f"\n| step | " + " | ".join(f"stage {s} s (peak GB)" for s in range(1, a.stages + 1)) + " |")
    print("|---|" + "---|" * a.stages)
    for step in ("kmeans", "accumulate", "merge"):
        cells = [next(r for r in res["steps"] if r["stage"] == s and r["step"] == step) for s in range(1, a.stages + 1)]
        print(f"| {step} | " + " | ".join(f"{c['seconds']} ({c['peak_gb']})" for c in cells) + " |")
    smp = res["steps"][-1]
    print(f"| sampler epoch | {smp['seconds']} ({smp['peak_gb']}) |\n")
    print(f"total {res['total_seconds']} s, peak {res['peak_gb']} GB, {res['stage_info']}")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
