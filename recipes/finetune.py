r"""Fine-tune an existing MoE CLIP (a moeclip MoE model directory or a CLIP-MoE .pt release) on your own data:
the router fine-tuning step alone, then a before/after report on data.val.

    accelerate launch recipes/finetune.py [--config recipes/configs/finetune.yaml] base=FILE.pt \
        data.train=train.json data.val=val.csv [finetune.mode=router+experts] [key=value ...]

Re-running the same command resumes where it stopped.
"""
import os
import sys
from pathlib import Path

from moeclip.config import parse_recipe_args
from moeclip.pipeline.common import run_guarded, setup_logging
from moeclip.pipeline.finetune import FinetuneConfig, run_finetune


def main() -> None:
    cfg = parse_recipe_args(FinetuneConfig, sys.argv[1:], Path(__file__).parent / "configs" / "finetune.yaml",
                            __doc__)
    setup_logging()
    report = run_finetune(cfg)
    if report and int(os.environ.get("RANK", "0")) == 0:
        print(f"report: {Path(cfg.output_dir) / 'report.md'} (better: {report['better']})")


if __name__ == "__main__":
    run_guarded(main)
