"""The DMU report's plots: drawn from the loop's histories and the evaluations, linked from report.md."""
from moeclip.pipeline.plots import write_plots
from moeclip.pipeline.report import render_markdown

MODEL = {"image_to_text_R@1": 0.5, "text_to_image_R@1": 0.4, "mean_R@1": 0.45, "protocol": "per_caption"}


def test_plots_are_written_and_linked(tmp_path):
    histories = {"mcl_stage_1_train": [{"step": s, "clip_loss": 3.0 - 0.1 * s, "lr": 1e-4} for s in (10, 20)],
                 "router_ft": [{"step": 10, "clip_loss": 1.0, "lb_visual": 1.02, "lb_text": 1.01}]}
    models = {"base": MODEL, "mcl_stage_1": {**MODEL, "mean_R@1": 0.5}, "dmu": {**MODEL, "mean_R@1": 0.55}}
    plots = write_plots(tmp_path, models, histories, "per_caption")
    assert plots == {"losses": "plots/losses.png", "stages": "plots/stages.png"}
    for path in plots.values():
        assert (tmp_path / path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = render_markdown({"models": models, "plots": plots, "protocol": "per_caption", "logs": "runs/x/logs"})
    assert "![losses](plots/losses.png)" in md and "tensorboard --logdir runs/x/logs" in md
    assert "Protocol `per_caption`" in md


def test_no_history_no_loss_plot_and_old_reports_say_multi_positive(tmp_path):
    assert write_plots(tmp_path, {"base": MODEL}, {}, "multi_positive") == {"stages": "plots/stages.png"}
    old = {k: v for k, v in MODEL.items() if k != "protocol"}  # report.json written before protocols existed
    assert "Protocol `multi_positive`" in render_markdown({"models": {"base": old}})
