"""Memory of a training table: columnar rows (today) against a list of per-row dicts (before), in the main
process and in forked DataLoader workers that read every row.

Each variant runs in a fresh process on the same synthetic N-row CSV (open_clip columns plus two factor
columns; no images are read: the items are skips). Reported per variant: seconds to read the table, the
main process's RSS growth, and each worker's private (unshared) memory after it read every row, from
/proc/<pid>/smaps_rollup. A list of dicts is copied page by page into every worker as reference counts touch
it; the columnar rows are two numpy arrays a column that forked workers share untouched.

    python bench/table_memory.py --rows 1000000 [--workers 2] [--out docs/table_memory.json]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, write_json  # noqa: E402


def _rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _private_mb(pid: int) -> float:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty")) / 1024


class _Touch(torch.utils.data.Dataset):
    """Reads row i the way a training item does, and reports this worker's private memory at the end."""

    def __init__(self, ds, dicts) -> None:
        self.ds, self.dicts = ds, dicts

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        if self.dicts is not None:
            row = self.dicts[i]
            return row["_path"], row["_caption"]
        return self.ds.rows.column("_path")[i], self.ds.rows.column("_caption")[i]


def _worker_private(ds, dicts, workers: int, n: int) -> list[float]:
    loader = torch.utils.data.DataLoader(_Touch(ds, dicts), batch_size=4096, num_workers=workers,
                                         multiprocessing_context="fork", collate_fn=lambda b: len(b))
    it = iter(loader)
    assert sum(next(it) for _ in range(len(loader))) == n  # every row read; the workers are still alive
    pids = [w.pid for w in it._workers]
    out = [_private_mb(p) for p in pids]
    del it
    return out


def child(table: str, variant: str, workers: int) -> dict:
    from moeclip.data.dataset import CaptionDataset
    base = _rss_mb()
    t = time.time()
    ds = CaptionDataset(table)
    dicts = None
    if variant == "dicts":  # the layout before: every row a dict of its columns plus _path and _caption
        dicts = [ds.rows[i] for i in range(len(ds))]
        ds.rows = None
    seconds = time.time() - t
    main_mb = _rss_mb() - base
    if variant == "dicts":
        ds.rows = type("R", (), {"__len__": lambda s: len(dicts)})()
    private = _worker_private(ds, dicts, workers, len(dicts) if dicts is not None else len(ds))
    return {"variant": variant, "read_s": round(seconds, 1), "main_rss_growth_mb": round(main_mb),
            "worker_private_mb": [round(p) for p in private]}


def write_table(path: Path, n: int) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title", "shape", "color"])
        for i in range(n):
            w.writerow([f"images/{i // 1000:04d}/{i:08d}.jpg",
                        f"a photo of a {('red', 'green', 'blue')[i % 3]} {('square', 'circle')[i % 2]} number {i % 977}",
                        ("square", "circle")[i % 2], ("red", "green", "blue")[i % 3]])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.workers)))
        return
    results = {"rows": args.rows, "workers": args.workers, "loadavg": os.getloadavg()[0], "variants": []}
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "table.csv"
        write_table(table, args.rows)
        results["table_mb"] = round(table.stat().st_size / 2**20)
        for variant in ("columnar", "dicts"):
            out = subprocess.run([sys.executable, __file__, "--child", str(table), variant, "--workers",
                                  str(args.workers)], capture_output=True, text=True, cwd=REPO, check=True)
            results["variants"].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(results["variants"][-1], flush=True)
    if args.out:
        write_json(Path(args.out), results)


if __name__ == "__main__":
    main()
