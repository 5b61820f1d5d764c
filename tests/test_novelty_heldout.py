"""bench/novelty_heldout.py: every model scored on the held-out set; gate shares only where a model has gates."""
import json

import moeclip
from moeclip.moe import upcycle


def test_scores_every_model_and_reports_gates(load_bench, micro_dir, corpus, tmp_path):
    model, _, _ = moeclip.load(micro_dir)
    upcycle(model, num_experts=2, top_k=1, shared_expert=True, shared_gate="novelty", novelty_clusters=8)
    gated = moeclip.save_model_dir(model, tmp_path / "gated")  # unfitted: every sample to the routed experts
    out = tmp_path / "heldout.json"
    results = load_bench("novelty_heldout").main(["--data", str(corpus["val"]), "--json", str(out),
                                                  "--model", f"dense={micro_dir}", f"gated={gated}"])
    assert "gate_shares" not in results["dense"]
    shares = results["gated"]["gate_shares"]
    assert all(s["to_base"] == 0.0 for s in shares.values())  # threshold +inf until fitted
    # an unfitted gate sends nothing to the base, so the MoE of identical copies scores like the dense model
    assert abs(results["gated"]["mean_R@1"] - results["dense"]["mean_R@1"]) < 1e-6
    assert json.loads(out.read_text())["models"]["dense"]["mean_R@1"] == results["dense"]["mean_R@1"]
