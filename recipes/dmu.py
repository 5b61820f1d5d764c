"""Diversified Multiplet Upcycling end to end: MCL stages -> upcycle -> router fine-tuning -> report.

    accelerate launch recipes/dmu.py [--config recipes/configs/default.yaml] [key=value ...]

With no arguments it runs on the shipped base checkpoint and the synthetic corpus (generated if absent).
Re-running the same command resumes where it stopped.
"""
import os
import sys
from pathlib import Path

from moeclip.config import parse_recipe_args
from moeclip.pipeline.common import run_guarded, setup_logging
from moeclip.pipeline.dmu import DMUConfig, run_dmu


def main() -> None:
    cfg = parse_recipe_args(DMUConfig, sys.argv[1:], Path(__file__).parent / "configs" / "default.yaml", __doc__)
    setup_logging()
    run_dmu(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"report: {Path(cfg.output_dir) / 'report.md'}")


if __name__ == "__main__":
    run_guarded(main)
