"""CPU threads: `accelerate launch` pins each process to one thread unless told; moeclip uses the cores."""
import torch

from moeclip.train.dist import DistributedConfig, cpu_threads_per_process, make_accelerator


def test_cpu_threads_follow_config_and_local_processes(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # what accelerate launch leaves behind
        make_accelerator()
        assert torch.get_num_threads() == cpu_threads_per_process() >= 1
        make_accelerator(DistributedConfig(cpu_threads=1))
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1000")
        assert cpu_threads_per_process() == 1  # never below one thread
    finally:
        torch.set_num_threads(before)
