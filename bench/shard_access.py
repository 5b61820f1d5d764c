"""Reading webdataset shards by position (`moeclip.data.shards`) vs streaming them, and what a regroup pass costs.

Cluster-conditioned batches (`moeclip.data.sampler.GroupBatchSampler`) visit rows in group order, not file
order. Two ways to serve them from shards: read each sample by its byte offset (what `ShardDataset` does), or
rewrite the corpus into group-ordered shards once per MCL stage (the groups change every stage) and stream those.
This times, on the synthetic corpus written both as a CSV and as shards: opening (indexing), decoding every
sample in row order and in cluster-batch order, webdataset's own streaming reader, the raw member reads alone,
and a regroup pass (read in group order, write group-ordered shards with webdataset's TarWriter).

    python bench/shard_access.py --n 20000 --shard-size 1000 --out runs/bench/shards.json

The files were just written, so the page cache is warm: these are CPU costs, not disk seeks (see
docs/benchmarks.md for what changes on a network file system).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moeclip.data.dataset import load_image  # noqa: E402
from moeclip.data.formats import open_dataset  # noqa: E402
from moeclip.data.sampler import GroupBatchSampler  # noqa: E402
from moeclip.data.shards import read_member  # noqa: E402
from moeclip.data.synth import SynthSpec, write_corpus  # noqa: E402


def timed(fn: Callable[[], object]) -> dict[str, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return {"wall_s": round(time.perf_counter() - w, 3), "cpu_s": round(time.process_time() - c, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--groups", type=int, default=8, help="cluster groups for the cluster-batch order")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shard_bench_"))
    spec = SynthSpec(train=args.n, val=1, seed=0)
    res: dict[str, object] = {"n": args.n, "shard_size": args.shard_size, "groups": args.groups, "batch": args.batch}
    res["write_csv"] = timed(lambda: write_corpus(work / "csv", spec))
    res["write_shards"] = timed(lambda: write_corpus(work / "wds", spec, format="wds", shard_size=args.shard_size))
    csv_path = work / "csv" / "train.csv"
    pattern = f"{work}/wds/train-{{000000..{(args.n - 1) // args.shard_size:06d}}}.tar"
    res["shard_bytes"] = sum(p.stat().st_size for p in (work / "wds").glob("train-*.tar"))
    res["png_bytes"] = sum(p.stat().st_size for p in (work / "csv" / "images" / "train").iterdir())
    holder: dict[str, object] = {}
    res["open_csv"] = timed(lambda: holder.__setitem__("csv", open_dataset(csv_path)))
    res["open_shards"] = timed(lambda: holder.__setitem__("wds", open_dataset(pattern)))
    csv_ds, wds_ds = holder["csv"], holder["wds"]
    rng = np.random.default_rng(0)
    labels = rng.integers(args.groups, size=args.n)
    order = np.concatenate(GroupBatchSampler(labels, args.n, args.batch, seed=0).global_batches(0))
    rows = np.arange(args.n)

    def decode_all(ds, idx) -> None:
        for i in idx:
            assert ds[int(i)]["ok"]

    def raw_all(idx) -> None:
        for i in idx:
            read_member(wds_ds.shards[wds_ds._shard[i]], int(wds_ds._offset[i]), int(wds_ds._size[i]))

    def stream() -> None:
        import webdataset as wds
        n = 0
        for sample in wds.WebDataset(pattern, shardshuffle=False, empty_check=False):
            load_image(io.BytesIO(sample["png"]))
            n += 1
        assert n == args.n

    def regroup() -> None:
        from webdataset import TarWriter
        out = work / "regrouped"
        out.mkdir(exist_ok=True)
        for s, start in enumerate(range(0, len(order), args.shard_size)):
            with TarWriter(str(out / f"{s:06d}.tar")) as tar:
                for i in order[start:start + args.shard_size]:
                    i = int(i)
                    png = read_member(wds_ds.shards[wds_ds._shard[i]], int(wds_ds._offset[i]), int(wds_ds._size[i]))
                    tar.write({"__key__": f"{s:06d}_{i:06d}", "png": png, "txt": wds_ds.rows[i]["_caption"].encode()})

    for name, fn in (("decode_shards_row_order", lambda: decode_all(wds_ds, rows)),
                     ("decode_shards_cluster_order", lambda: decode_all(wds_ds, order)),
                     ("decode_csv_row_order", lambda: decode_all(csv_ds, rows)),
                     ("decode_csv_cluster_order", lambda: decode_all(csv_ds, order)),
                     ("decode_webdataset_stream", stream),
                     ("raw_reads_row_order", lambda: raw_all(rows)),
                     ("raw_reads_cluster_order", lambda: raw_all(order)),
                     ("regroup_pass", regroup)):
        res[name] = timed(fn)
        res[name]["samples"] = len(order) if "cluster" in name or name == "regroup_pass" else args.n
        print(name, res[name], flush=True)
    res["load_avg_after"] = os.getloadavg()
    shutil.rmtree(work)
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
