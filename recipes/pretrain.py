"""Pre-train a small CLIP from scratch on a CSV corpus (makes the shipped base checkpoint).

    accelerate launch recipes/pretrain.py [--config recipes/configs/pretrain.yaml] [key=value ...]
"""
import sys
from pathlib import Path

from moeclip.config import parse_recipe_args
from moeclip.pipeline.common import run_guarded, setup_logging
from moeclip.pipeline.pretrain import PretrainConfig, run_pretrain


def main() -> None:
    cfg = parse_recipe_args(PretrainConfig, sys.argv[1:], Path(__file__).parent / "configs" / "pretrain.yaml",
                            __doc__)
    setup_logging()
    run_pretrain(cfg)


if __name__ == "__main__":
    run_guarded(main)
