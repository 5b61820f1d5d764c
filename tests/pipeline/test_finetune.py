"""recipes/finetune.py launched the way users launch it: a tiny MoE model fine-tuned on ShareGPT4V-style JSON
with a stretched text context, stopped after a checkpoint, resumed, and reported before/after."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _tiny_moe(out: Path) -> Path:
    import torch

    import moeclip
    torch.manual_seed(0)
    model, _, _ = moeclip.load(REPO / "checkpoints" / "base-tiny")
    moeclip.upcycle(model, None, num_experts=2, top_k=1, jitter=0.0)
    return moeclip.save_model_dir(model, out)


def _as_sharegpt4v(csv_ds, path: Path) -> Path:
    entries = [{"id": str(i), "image": r["_path"],
                "conversations": [{"from": "human", "value": "<image>\nDescribe it."},
                                  {"from": "gpt", "value": r["_caption"]}]} for i, r in enumerate(csv_ds.rows)]
    entries.append({"id": "bad", "conversations": []})  # skipped and counted, never fatal
    path.write_text(json.dumps(entries))
    return path


@pytest.mark.slow
def test_finetune_recipe_reports_and_resumes(tmp_path, corpus):
    from moeclip.data.dataset import CaptionDataset
    base = _tiny_moe(tmp_path / "base")
    train = _as_sharegpt4v(CaptionDataset(corpus["train"]), tmp_path / "train.json")
    out = tmp_path / "ft"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "recipes" / "finetune.py"),
           f"base={base}", f"output_dir={out}", f"data.train={train}", f"data.val={corpus['val']}",
           "data.synth.enabled=false", "model.context_length=32", "finetune.mode=router+experts",
           "finetune.train.steps=4", "finetune.train.global_batch=32", "finetune.train.lr=0.0001",
           "finetune.train.warmup_steps=1", "finetune.train.ckpt_every=2", "eval_batch=64"]
    # a run that stops after its step-2 checkpoint leaves no model and no report
    first = subprocess.run([*cmd, "finetune.train.stop_at=2"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped at step 2 of 4" in first.stdout and not (out / "model").exists()
    assert (out / "train" / "ckpt" / "step_0000002" / "state.json").exists()
    # the same command without stop_at continues from step 2
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr and "(step 2)" in second.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["finetune"]["steps"] == 4 and report["finetune"]["mode"] == "router+experts"
    assert report["finetune"]["skipped"] == {"no image path": 1}
    assert report["environment"]["device"] == "cpu" and report["environment"]["world_size"] == 1
    delta = report["after"]["mean_R@1"] - report["before"]["mean_R@1"]
    assert report["change"]["mean_R@1"] == pytest.approx(delta, abs=1e-6)
    assert report["better"] == ("after" if delta > 0 else "before" if delta < 0 else "tie")
    md = (out / "report.md").read_text()
    assert md.startswith("# Fine-tuning report")
    assert {"after": "Fine-tuning helped", "before": "made the model WORSE", "tie": "No change"}[report["better"]] in md
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["model_cfg"]["text_cfg"]["context_length"] == 32 and saved["moe"]["num_experts"] == 2
    # re-running a finished run trains nothing and reports the same numbers
    third = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "already fine-tuned" in third.stderr
    again = json.loads((out / "report.json").read_text())
    assert again["before"] == report["before"] and again["after"] == report["after"]


@pytest.mark.slow
def test_a_clip_moe_release_file_is_a_base(tmp_path, corpus):
    """A CLIP-MoE .pt (the authors' layout, 248 positions) fine-tunes in-process; the result is a moeclip directory
    with the file's shape, the chosen top-k, and a before/after report."""
    import importlib.util

    import torch

    from moeclip.pipeline.common import DataConfig
    from moeclip.pipeline.finetune import FinetuneConfig, run_finetune
    from moeclip.train.loop import TrainConfig
    from moeclip.train.moe_finetune import MoEFinetuneConfig
    spec = importlib.util.spec_from_file_location("layout_test", REPO / "tests" / "model" / "test_clip_moe_layout.py")
    layout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layout)
    pt = tmp_path / "clip-moe-tiny.pt"
    torch.save(layout.make_state(), pt)
    # the table away from its images and factors.json (the factor probe's 248-token prompts take a minute here):
    # data.image_root says where the images are
    val = tmp_path / "elsewhere" / "val.csv"
    val.parent.mkdir()
    val.write_text(corpus["val"].read_text())
    cfg = FinetuneConfig(base=str(pt), top_k=1, output_dir=str(tmp_path / "ft"), eval_batch=64,
                         data=DataConfig(train=str(corpus["train"]), val=str(val), cache_mb=0,
                                         image_root=str(corpus["val"].parent)),
                         finetune=MoEFinetuneConfig(train=TrainConfig(steps=2, global_batch=32, warmup_steps=1,
                                                                      ckpt_every=2)))
    report = run_finetune(cfg)
    assert report["better"] in ("after", "before", "tie") and report["finetune"]["mode"] == "router"
    assert report["before"]["num_images"] == 64 and report["before"]["skipped"] == {}
    saved = json.loads((tmp_path / "ft" / "model" / "config.json").read_text())
    assert saved["moe"]["top_k"] == 1 and saved["model_cfg"]["text_cfg"]["context_length"] == 248


def test_dense_base_and_misplaced_top_k_are_refused(tmp_path, corpus, micro_dir):
    from moeclip.config import ConfigError
    from moeclip.pipeline.finetune import FinetuneConfig, run_finetune
    from moeclip.pipeline.common import DataConfig
    data = DataConfig(train=str(corpus["train"]), val=str(corpus["val"]))
    with pytest.raises(ConfigError, match="a dense model; this recipe fine-tunes an MoE CLIP"):
        run_finetune(FinetuneConfig(base=str(micro_dir), output_dir=str(tmp_path / "x"), data=data))
    with pytest.raises(ConfigError, match="top_k=2: applies to a CLIP-MoE .pt base"):
        run_finetune(FinetuneConfig(base=str(micro_dir), top_k=2, output_dir=str(tmp_path / "y"), data=data))


def test_help_and_usage_errors_exit_cleanly():
    """argparse's exits (--help 0, a usage error 2) are not crashes: no traceback, their own exit code."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    script = str(REPO / "recipes" / "finetune.py")
    ok = subprocess.run([sys.executable, script, "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "base=FILE.pt" in ok.stdout and "Traceback" not in ok.stderr
    bad = subprocess.run([sys.executable, script, "--bogus"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unrecognized arguments: --bogus" in bad.stderr and "Traceback" not in bad.stderr
