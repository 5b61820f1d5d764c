"""`moeclip eval` on webdataset shards gives exactly the metrics of the same corpus as a CSV."""
import json

import moeclip
from moeclip.cli import main
from moeclip.data.synth import SynthSpec, write_corpus
from moeclip.eval.evaluate import evaluate


def test_eval_on_shards_equals_eval_on_the_csv(corpus, micro_dir, tmp_path):
    # the session corpus's val split (seed 3) again, as 3 shards: same images, captions and factor columns
    wds = write_corpus(tmp_path / "wds", SynthSpec(train=1, val=64, seed=3), format="wds", shard_size=25)
    model, pre, tok = moeclip.load(micro_dir)
    m_csv = evaluate(model, pre, tok, corpus["val"], class_column="shape", progress=False)
    m_wds = evaluate(model, pre, tok, wds["val"], class_column="shape", progress=False)
    assert m_wds == m_csv and "factors" in m_wds and "zeroshot" in m_wds
    out = tmp_path / "m.json"
    assert main(["eval", "--model", str(micro_dir), "--data", str(wds["val"]), "--device", "cpu",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["mean_R@1"] == m_csv["mean_R@1"]
