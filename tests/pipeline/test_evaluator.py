"""A recipe's cached evaluations are reused only when the same retrieval protocol made them."""
import json

from moeclip import load
from moeclip.pipeline.evaluator import Evaluator
from moeclip.runtime import Runtime


def test_cached_metrics_of_another_protocol_are_recomputed(micro_dir, corpus, tmp_path):
    model, pre, tok = load(micro_dir)
    calls, logged = [], []

    def make():
        calls.append(1)
        return model

    def run(protocol):
        ev = Evaluator(tmp_path, pre, tok, str(corpus["val"]), 64, Runtime.local("cpu"), protocol=protocol,
                       on_result=lambda name, m: logged.append((name, m.get("protocol"))))
        ev("base", make)
        return ev.results["base"]

    assert run("per_caption")["protocol"] == "per_caption" and len(calls) == 1
    assert run("per_caption")["protocol"] == "per_caption" and len(calls) == 1  # cached
    assert run("multi_positive")["protocol"] == "multi_positive" and len(calls) == 2
    cached = json.loads((tmp_path / "base.json").read_text())
    del cached["protocol"]  # a file from before protocols existed: made by the merged protocol
    (tmp_path / "base.json").write_text(json.dumps(cached))
    assert "protocol" not in run("multi_positive") and len(calls) == 2  # reused: it is that protocol's
    assert run("per_caption")["protocol"] == "per_caption" and len(calls) == 3
    assert logged == [("base", "per_caption")] * 2 + [("base", "multi_positive"), ("base", None),
                                                      ("base", "per_caption")]
