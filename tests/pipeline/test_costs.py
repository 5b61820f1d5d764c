"""report.md's cost and retention tables come from report.json's numbers."""
from moeclip.pipeline.costs import costs_markdown


def test_cost_and_retention_tables():
    report = {"models": {"base": {"mean_R@1": 0.5}, "dmu": {"mean_R@1": 0.625}},
              "costs": {"base": {"train_samples": 0, "train_flops": 0.0, "image_flops": 2e7, "caption_flops": 8e6},
                        "dmu": {"train_samples": 134400, "train_flops": 3.2e12, "image_flops": 4e7,
                                "caption_flops": 9e6}},
              "also_val": {"old": {"base": {"mean_R@1": 0.7}, "dmu": {"mean_R@1": 0.655}}}}
    text = "\n".join(costs_markdown(report))
    assert "| dmu | 62.5 | 134,400 | 3,200 | 0.040 | 0.009 |" in text
    assert "| dmu | 62.5 | 65.5 |" in text and "`old`" in text
    assert costs_markdown({"models": {}}) == []
