"""The smoke pipeline on webdataset shards: killed with SIGKILL mid-stage (embedding, MCL training, router
fine-tuning, a baseline) and re-run, it ends with the report of an uninterrupted run on the same corpus as a
CSV. The shards hold the CSV's exact bytes and rows in the same order, so "within noise" is 1e-6 here."""
import io
import json
import os
import subprocess

import pytest
from PIL import Image
from webdataset import TarWriter
from test_resume import _cmd, _flat, _run_until  # tests/pipeline/test_resume.py: the kill-and-resume helpers

from moeclip.data.synth import SynthSpec, write_corpus

SHARD_SIZE = 200  # smoke corpus: 512 train samples -> 3 shards, 128 val -> 1


def _on_shards(cmd: list[str], data) -> list[str]:
    """The same recipe command reading shards that `data.synth.format=wds` writes."""
    kept = [a for a in cmd if not a.startswith(("data.train=", "data.val=", "baselines."))]
    return [*kept, f"data.train={data}/train-{{000000..000002}}.tar", f"data.val={data}/val-{{000000..000000}}.tar",
            "data.synth.format=wds", f"data.synth.shard_size={SHARD_SIZE}"]


@pytest.mark.slow
def test_shards_killed_and_resumed_give_the_csv_report(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with_baselines = ("baselines.upcycle=", "baselines.dense_ft=", "baselines.dmu_router_experts=")
    ref = tmp_path / "csv"
    _run_until([a for a in _cmd(ref, tmp_path / "csv_data") if not a.startswith(with_baselines)], None, env,
               timeout=900)
    out, data = tmp_path / "wds", tmp_path / "wds_data"
    cmd = _on_shards(_cmd(out, data), data)
    triggers = [out / "mcl/stage_1/features/progress.json",    # the embedding pass streaming the shards
                out / "mcl/stage_1/train/ckpt/step_0000003",   # cluster-conditioned batches drawn from shards
                out / "router_ft/ckpt/step_0000003",           # router fine-tuning
                out / "baselines/upcycle/train/ckpt/step_0000003"]
    killed = [_run_until(cmd, t, env, timeout=900) for t in triggers]
    assert sum(killed) >= 3, killed
    _run_until(cmd, None, env, timeout=900)
    assert sorted(p.name for p in data.iterdir()) == ["factors.json", "train-000000.tar", "train-000001.tar",
                                                      "train-000002.tar", "val-000000.tar"]
    a = json.loads((ref / "report.json").read_text())["models"]
    b = json.loads((out / "report.json").read_text())["models"]
    assert {"base", "mcl_stage_2", "dmu", "upcycle", "dense_ft", "dmu_router_experts"} <= set(b)
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys() and len(fa) > 40
    for k, v in fa.items():
        assert abs(v - fb[k]) <= 1e-6, (k, v, fb[k])


@pytest.mark.slow
def test_bad_members_reach_the_report_and_a_corrupt_shard_stops_the_run(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    data = tmp_path / "data"
    write_corpus(data, SynthSpec(train=512, val=128, seed=1), format="wds", shard_size=SHARD_SIZE)  # as smoke.yaml
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (90, 90, 90)).save(buf, format="PNG")
    with TarWriter(str(data / "train-000003.tar")) as tar:  # one more shard, with one bad sample of each kind
        tar.write({"__key__": "fine", "png": buf.getvalue(), "txt": b"a large white plain square at the center",
                   "json": json.dumps({"size": "large", "colour": "white", "pattern": "plain", "shape": "square",
                                       "position": "center"}).encode()})
        tar.write({"__key__": "undecodable", "png": b"\x89PNG but not really", "txt": b"a broken picture"})
        tar.write({"__key__": "uncaptioned", "png": buf.getvalue()})
        tar.write({"__key__": "imageless", "txt": b"a caption with no image"})
    cmd = [a.replace("{000000..000002}", "{000000..000003}") for a in _on_shards(_cmd(tmp_path / "run", data), data)]
    _run_until(cmd, None, env, timeout=900)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["data"]["rows"] == 512 + 2 and report["data"]["format"] == "shards"
    assert report["data"]["skipped"] == {"no caption (txt member or json caption)": 1,
                                         "no image member (jpg/png/jpeg/webp)": 1, "not an image": 1}
    assert "samples skipped: 1 no caption" in (tmp_path / "run" / "report.md").read_text()
    # a damaged shard ends the run with one line naming it (exit code 2: bad input, not a crash)
    whole = (data / "train-000001.tar").read_bytes()
    (data / "train-000001.tar").write_bytes(whole[: len(whole) // 3])
    run = subprocess.run([a.replace(str(tmp_path / "run"), str(tmp_path / "broken")) for a in cmd], env=env, capture_output=True, text=True, timeout=900)
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 2 and last.startswith("error: ") and str(data / "train-000001.tar") in last, \
        run.stderr[-2000:]
