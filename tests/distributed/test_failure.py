"""One rank raising makes every rank exit non-zero within 60 s, and the failing rank's error is shown."""
import os
import subprocess
import sys
import time
from pathlib import Path

TORCHRUN = Path(sys.executable).parent / "torchrun"


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_failing_rank_takes_the_job_down(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "--max_restarts", "0",
           str(Path(__file__).parent / "fail_worker.py")]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    ended = time.time()
    out = run.stdout + run.stderr
    assert run.returncode != 0, out[-3000:]
    failed_at = float(out.split("FAILING_AT ")[1].split()[0])
    assert ended - failed_at < 60, f"the job ended {ended - failed_at:.0f} s after rank 1 failed"
    assert "rank 1 failed on purpose" in out, out[-3000:]
    assert "rank 0 passed the barrier" not in out
