"""Weights come from safetensors, or from torch files read with weights_only=True: a pickle that would
run code on load is refused, and its code never runs."""
import pickle

import pytest
import torch

from moeclip import load


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if unpickled


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {"x": _Payload(str(marker))}}, f)
    with pytest.raises(ValueError, match="evil.pt"):
        load("moeclip-micro", pretrained=str(evil))
    assert not marker.exists()
    # the same protection inside the training resume path
    from moeclip.io import load_torch_state
    with pytest.raises(pickle.UnpicklingError):
        load_torch_state(evil)
    assert not marker.exists()


def test_plain_torch_state_dict_loads(micro_dir, tmp_path):
    ref, _, _ = load(micro_dir)
    pt = tmp_path / "w.pt"
    torch.save(ref.state_dict(), pt)
    model, _, _ = load("moeclip-micro", pretrained=str(pt))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
