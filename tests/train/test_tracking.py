"""Training logs through accelerate's trackers: one TensorBoard run per pipeline step, rank 0 only."""
import importlib.util
import logging
from types import SimpleNamespace

import pytest

from moeclip import load
from moeclip.data.dataset import CaptionDataset
from moeclip.train import tracking
from moeclip.train.dist import make_runtime
from moeclip.train.loop import TrainConfig
from moeclip.train.moe_finetune import MoEFinetuneConfig, finetune_moe
from moeclip.train.tracking import LoggingConfig, configure, eval_values, open_step, run_name, train_values

HAVE_TB = importlib.util.find_spec("tensorboard") is not None
needs_tb = pytest.mark.skipif(not HAVE_TB, reason="tensorboard is not installed (pip install -e '.[tensorboard]')")


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_names_and_values():
    assert run_name("MCL stage 1") == "mcl_stage_1" and run_name("DMU router+experts") == "dmu_router_experts"
    values = train_values({"step": 3, "lr": 1e-3, "clip_loss": 2.0, "lb_visual": 1.1, "z_text": 0.5, "loss": 2.2,
                           "samples_per_s": 40.0})
    assert values == {"train/lr": 1e-3, "train/contrastive_loss": 2.0, "train/load_balancing_loss_visual": 1.1,
                      "train/z_loss_text": 0.5, "train/loss": 2.2, "train/samples_per_s": 40.0}
    ev = eval_values("dmu", {"mean_R@1": 0.5, "num_images": 64, "protocol": "per_caption", "factors": {"shape": 0.7}})
    assert ev == {"mean_R@1/dmu": 0.5, "factor_shape/dmu": 0.7, "protocol/dmu": "per_caption"}


def test_nothing_is_opened_unless_configured_and_on_rank_0(tmp_path):
    assert not open_step(SimpleNamespace(is_main_process=True), "x").active  # no recipe configured logging
    other_rank = SimpleNamespace(is_main_process=False)
    configure(other_rank, LoggingConfig(), tmp_path)
    assert not open_step(other_rank, "x").active and not (tmp_path / "logs").exists()


def test_missing_tensorboard_warns_once_and_continues(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(tracking, "_warned", set())
    trainer = SimpleNamespace(is_main_process=True)
    configure(trainer, LoggingConfig(), tmp_path)
    with caplog.at_level(logging.WARNING, logger="moeclip.train.tracking"):
        assert not open_step(trainer, "a").active and not open_step(trainer, "b").active
    assert len([r for r in caplog.records if "tensorboard is not installed" in r.message]) == 1
    with pytest.raises(ValueError, match="logging.wandb=true but wandb is not installed"):
        configure(trainer, LoggingConfig(wandb=True), tmp_path)


@needs_tb
def test_router_finetuning_writes_losses_rate_and_router_stats(moe_dir, corpus, tmp_path):
    model, pre, tok = load(moe_dir)
    runtime = make_runtime()
    root = configure(runtime.trainer, LoggingConfig(), tmp_path / "run")
    cfg = MoEFinetuneConfig(z_coef=0.001, train=TrainConfig(steps=3, global_batch=16, warmup_steps=1, log_every=1,
                                                            ckpt_every=3))
    result = finetune_moe(model, CaptionDataset(corpus["train"], pre), tok, cfg, tmp_path / "run" / "ft", runtime,
                          desc="router FT")
    assert root == tmp_path / "run" / "logs" and list((root / "router_ft").glob("events.out.tfevents.*"))
    scalars = _scalars(root / "router_ft")
    for tag in ("train/contrastive_loss", "train/load_balancing_loss_visual", "train/z_loss_text", "train/lr",
                "train/samples_per_s", "router/visual.0/entropy_bits", "router/text.0/load_e2"):
        assert len(scalars[tag]) == 3, tag
    assert [e["samples_per_s"] > 0 for e in result["history"]] == [True] * 3
    # the logged load of a layer is a distribution over its experts, its entropy at most log2(3) bits
    loads = [scalars[f"router/visual.0/load_e{i}"][-1] for i in range(3)]
    assert sum(loads) == pytest.approx(1.0, abs=1e-3) and 0 < scalars["router/visual.0/entropy_bits"][-1] <= 1.585
    del runtime.trainer.moeclip_logging


def test_wandb_run_per_step_when_configured(tmp_path, monkeypatch):
    """W&B is not a dependency: a stand-in module records what accelerate's WandBTracker asks of it."""
    import importlib.machinery
    import sys

    runs = []

    class Run:
        def __init__(self, **kwargs):
            self.kwargs, self.logged, self.finished = kwargs, [], False
            runs.append(self)

        def log(self, values, step=None):
            self.logged.append((step, values))

        def finish(self):
            self.finished = True

    fake = SimpleNamespace(init=lambda **kw: Run(**kw), __spec__=importlib.machinery.ModuleSpec("wandb", None))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    trainer = SimpleNamespace(is_main_process=True)
    configure(trainer, LoggingConfig(tensorboard=False, wandb=True, wandb_project="proj"), tmp_path / "dmu")
    step = open_step(trainer, "mcl_stage_1")
    step.log({"train/loss": 1.5}, step=10)
    step.close()
    assert runs[0].kwargs == {"project": "proj", "name": "dmu/mcl_stage_1", "group": "dmu",
                              "dir": str(tmp_path / "dmu" / "logs")}
    assert runs[0].logged == [(10, {"train/loss": 1.5})] and runs[0].finished
