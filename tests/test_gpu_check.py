"""bench/gpu_check.sh's CPU part, as CI runs it: without a GPU the script says so in one line and still
checks the pipeline in bf16 autocast and that the saved model re-evaluates to the report's numbers."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine run bench/gpu_check.sh itself")
def test_gpu_check_cpu_part(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path / "gc")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    lines = run.stdout.splitlines()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert lines[0].startswith("gpu_check: no CUDA GPU here")
    checks = [line for line in lines if line.startswith("gpu_check: ") and " ok " in line]
    assert any("smoke DMU pipeline" in c for c in checks) and any("re-evaluates" in c for c in checks)
    assert lines[-1].endswith("all checks passed")
