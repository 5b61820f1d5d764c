"""bench/study_tables.py: margins are taken to the same seed's better baseline, and the tables come out the same
from the committed archive once runs/ is gone (runs/ is not in git; a lost runs/ once took the study with it)."""
import json
import shutil
from pathlib import Path


def _write(run: Path, scores: dict[str, float], old: dict[str, float] | None = None, **extra) -> None:
    cost = {"train_samples": 134400, "train_flops": 2e13, "image_flops": 4.5e7, "caption_flops": 1.3e7}
    report = {"models": {k: {"mean_R@1": v} for k, v in scores.items()}, "costs": {k: cost for k in scores},
              "construction": "dmu", "expert_distance": [[0.0, 0.03], [0.03, 0.0]],
              "expert_usage": [{"load_cv": 0.1}, {"load_cv": 0.3}],
              "environment": {"cpu": "AMD EPYC", "cpu_capability": "AVX512", "commit": "0" * 40}}
    if old:
        report["also_val"] = {"old": {k: {"mean_R@1": v} for k, v in old.items()}}
    report.update(extra)
    run.mkdir(parents=True)
    (run / "report.json").write_text(json.dumps(report))


def test_margins_per_seed_and_archive_round_trip(tmp_path, load_bench):
    st = load_bench("study_tables")
    runs = tmp_path / "runs"
    # seed 0: dense_ft is the better baseline; seed 1: upcycle is
    _write(runs / "dmu_s0", {"base": 0.60, "dmu": 0.62, "upcycle": 0.65, "dense_ft": 0.66})
    _write(runs / "dmu_s1", {"base": 0.60, "dmu": 0.63, "upcycle": 0.67, "dense_ft": 0.64})
    _write(runs / "con" / "drop_s0", {"drop_upcycle": 0.67})
    _write(runs / "adapt_s0", {"base": 0.04, "dmu": 0.40, "upcycle": 0.65, "dense_ft": 0.66},
           old={"base": 0.60, "dmu": 0.09, "upcycle": 0.05, "dense_ft": 0.04})
    gate = {"old": {"visual.transformer.novelty_gate": {"to_base": 0.7, "mean_gate": 0.7, "samples": 2000}}}
    _write(runs / "con" / "adapt_drop_novelty_s0", {"drop_upcycle": 0.655}, old={"drop_upcycle": 0.40},
           novelty_gate=gate)
    st.RUNS_ROOT[0] = runs
    targets = st.target_table(runs)
    dmu_row = next(line for line in targets.splitlines() if line.startswith("| DMU (published"))
    assert "-4.0 ± 0.0 (n=2, no)" in dmu_row  # 62-66 and 63-67: each seed against its own better baseline
    assert "+4.0 (n=1, no)" in dmu_row  # old domain: 9 against the better baseline's 5
    drop_row = next(line for line in targets.splitlines() if line.startswith("| Drop-Upcycling r=0.5"))
    assert "+1.0 (n=1, no)" in drop_row
    novelty_row = next(line for line in targets.splitlines() if line.startswith("| Drop-Upcycling + novelty"))
    assert "-0.5 (n=1, yes)" in novelty_row and "+35.0 (n=1, yes)" in novelty_row  # within 1 new, +5 old
    default, adapt = st.table(runs, "dmu"), st.retention_table(runs)
    assert "| DMU (published: routers only) | 2 | 62.5 ± 0.7 |" in default
    assert "3.0-3.0%; load CV 0.200" in default

    archive = tmp_path / "study_runs.json"
    st.archive(runs, archive)
    shutil.rmtree(runs)
    st.ARCHIVE.clear()
    assert st.table(runs, "dmu").count("\n") == 2  # nothing on disk, nothing archived: header only
    st.ARCHIVE.update(json.loads(archive.read_text()))
    assert st.ARCHIVE["dmu_s0"]["environment"]["cpu_capability"] == "AVX512"  # kept: where a run came from
    assert st.ARCHIVE["con/adapt_drop_novelty_s0"]["novelty_gate"] == gate
    assert st.target_table(runs) == targets
    assert st.table(runs, "dmu") == default and st.retention_table(runs) == adapt
