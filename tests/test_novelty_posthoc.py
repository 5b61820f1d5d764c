"""bench/novelty_posthoc.py: a dense fine-tuned model gated after the fact keeps its own FFNs for training-like
samples and the base's for the rest, and the JSON records both models on every set."""
import json

import torch

import moeclip


def test_posthoc_gate_on_a_dense_model(load_bench, micro_dir, corpus, tmp_path):
    tuned, _, _ = moeclip.load(micro_dir)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if ".mlp." in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    tuned_dir = moeclip.save_model_dir(tuned, tmp_path / "tuned")
    bench = load_bench("novelty_posthoc")
    out = tmp_path / "posthoc.json"
    results = bench.main(["--base", str(micro_dir), "--model", f"ft={tuned_dir}", "--train", str(corpus["train"]),
                          "--data", f"val={corpus['val']}", "--seed", "1", "--json", str(out)])
    row = results["ft"]
    assert set(row["ft"]) == set(row["ft+novelty_gate"]) == {"val"}
    assert set(row["gate_shares"]["val"]) == {"visual.transformer.novelty_gate", "transformer.novelty_gate"}
    assert json.loads(out.read_text())["seed_1"]["ft"]["ft"] == row["ft"]
    # the gated model: the tuned FFN as its one routed expert, the base's FFN as the shared one
    base = moeclip.load(micro_dir)[0]
    gated = bench.gated(base, tuned)
    layer = gated.visual.transformer.resblocks[0].mlp
    assert torch.equal(layer.experts[0].c_fc.weight, tuned.visual.transformer.resblocks[0].mlp.c_fc.weight)
    assert torch.equal(layer.shared.c_fc.weight, base.visual.transformer.resblocks[0].mlp.c_fc.weight)
