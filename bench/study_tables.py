"""Issue 16's study tables from the runs bench/dmu_study.sh leaves: every construction against the baselines of
the same seed, mean +- std over seeds, with training samples and FLOPs, inference FLOPs and the expert diversity.

    python bench/study_tables.py [--runs runs] [--out docs/study_tables.md] [--archive docs/study_runs.json]

A row whose runs are missing for some seeds shows how many it has (n); nothing is filled in or extrapolated.
--archive keeps a slim copy of every run's report (scores, costs, expert distances) in the repo and reads a run
from it when runs/ no longer holds it: runs/ is not committed, and a lost runs/ folder once took the tables with it.
"""
import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Callable

from common import mean_std  # bench/common.py: "mean ± std" cells, shared with wise_ft.py

SEEDS = (0, 1, 2)
BASELINES = ("upcycle", "dense_ft")
# (label, run folder for a seed, model key in that run's report.json); the run folder's baselines are the seed's
# own unless the construction's run has none, then the corpus's main run of that seed gives them
Row = tuple[str, Callable[[Path, int], Path], str]


def _main(prefix: str) -> Callable[[Path, int], Path]:
    """The corpus's DMU run of a seed (construction=dmu, with both baselines): runs/dmu_s0, runs/muted_s1, ..."""
    return lambda runs, s: runs / f"{prefix}_s{s}"


def _con(name: str, prefix: str) -> Callable[[Path, int], Path]:
    """A construction's run on a seed's MCL stages: runs/con/drop_s0 (default corpus), runs/con/muted_drop_s0"""
    folder = name if prefix == "dmu" else f"{prefix}_{name}"
    return lambda runs, s: runs / "con" / f"{folder}_s{s}"


def rows_for(prefix: str) -> list[Row]:
    main = _main(prefix)
    rows: list[Row] = [("base", main, "base"), *[(f"MCL stage {i}", main, f"mcl_stage_{i}") for i in (1, 2, 3)],
                       ("DMU (published: routers only)", main, "dmu"),
                       ("DMU, routers + experts", main, "dmu_router_experts")]
    if prefix == "dmu":
        rows += [("DMU, zero router init (old default)", _con("zero_router", prefix), "dmu"),
                 ("DMU, chained stages", lambda runs, s: runs / "var" / f"start_prev_s{s}", "dmu")]
    # a construction without runs on this corpus is left out of its table (docs/results.md says which)
    rows += [("DMU + shared expert", _con("shared", prefix), "dmu"),
             ("cluster specialists", _con("specialists", prefix), "dmu"),
             ("Drop-Upcycling r=0.5 (the default)", _con("drop", prefix), "drop_upcycle"),
             # construction=drop_upcycle upcycle.shared_expert=true construction_ft.freeze_shared=true
             ("Drop-Upcycling + frozen shared base expert", _con("drop_frozen_shared", prefix), "drop_upcycle"),
             # the same with upcycle.shared_gate=novelty: samples unlike the training data go to the base's FFN
             ("Drop-Upcycling + novelty-gated frozen base expert", _con("drop_novelty", prefix), "drop_upcycle"),
             # its control: one routed expert (dense FFN fine-tuning, top-1) beside the same gated base FFN
             ("dense FFN + novelty-gated frozen base expert (control)", _con("dense_novelty", prefix), "drop_upcycle")]
    rows += [("baseline: upcycle", main, "upcycle"), ("baseline: dense_ft", main, "dense_ft")]
    return rows


ARCHIVE: dict[str, dict] = {}  # run folder relative to --runs -> slim report (see _slim)
RUNS_ROOT = [Path("runs")]  # --runs, the folder ARCHIVE's keys are relative to


def _report(path: Path) -> dict | None:
    f = path / "report.json"
    if f.exists():
        return json.loads(f.read_text())
    return ARCHIVE.get(path.relative_to(RUNS_ROOT[0]).as_posix()) if path.is_relative_to(RUNS_ROOT[0]) else None


def _slim(report: dict, run: Path) -> dict:
    """What the tables read from a run, small enough to commit: mean R@1 per model and validation set, costs,
    construction, DMU's expert distances, router load CV, the other MoEs' weight distances, and the environment
    (machine, versions, commit) where the report has one."""
    def scores(models: dict) -> dict:
        return {k: {"mean_R@1": v["mean_R@1"]} for k, v in models.items() if "mean_R@1" in v}
    slim = {"models": scores(report["models"]),
            "also_val": {name: scores(m) for name, m in report.get("also_val", {}).items()},
            "costs": report.get("costs", {}), "construction": report.get("construction", "dmu"),
            "expert_usage": [{"load_cv": u["load_cv"]} for u in report.get("expert_usage") or []]}
    for key in ("expert_distance", "environment", "novelty_gate"):  # environment: reports from 2026-12-07 on
        if key in report:
            slim[key] = report[key]
    pairs = {key: _weight_distances(_model_dir(report, key, run)) for key in MODEL_DIRS}
    slim["weight_distances"] = {key: p for key, p in pairs.items() if p}
    return slim


def archive(runs: Path, path: Path) -> None:
    """Adds every run under `runs` with a report to the archive file (a run on disk replaces its old entry)."""
    for f in sorted(runs.glob("**/report.json")):
        ARCHIVE[f.parent.relative_to(runs).as_posix()] = _slim(json.loads(f.read_text()), f.parent)
    path.write_text(json.dumps(ARCHIVE, indent=1, sort_keys=True) + "\n")


def _score(report: dict, key: str, also: str | None) -> float | None:
    models = report.get("also_val", {}).get(also, {}) if also else report["models"]
    return 100 * models[key]["mean_R@1"] if key in models else None


def _best_baseline(main_report: dict, also: str | None) -> float | None:
    scores = [_score(main_report, b, also) for b in BASELINES]
    scores = [s for s in scores if s is not None]
    return max(scores) if len(scores) == len(BASELINES) else None


MODEL_DIRS = {"dmu": "model", "drop_upcycle": "baselines/drop_upcycle/model", "upcycle": "baselines/upcycle/model",
              "dmu_router_experts": "ablations/dmu_router_experts/model"}


def _model_dir(report: dict, key: str, run: Path) -> Path:
    """Where a run saved model `key`: a construction's main model is in model/, the others in MODEL_DIRS."""
    return run / ("model" if report.get("construction", "dmu") == key else MODEL_DIRS[key])


def _weight_distances(model_dir: Path) -> list[float]:
    """Relative L2 between every pair of routed experts over all MoE layers' FFN weights, read from the saved
    model (for models whose report has no `expert_distance`: the upcycled baselines and Drop-Upcycling)."""
    f = model_dir / "model.safetensors"
    if not f.exists():
        return []
    from safetensors.torch import load_file
    from moeclip.model.ffn import ffn_distance
    experts: dict[int, dict[str, object]] = {}
    for name, tensor in load_file(str(f)).items():
        m = re.search(r"\.mlp\.experts\.(\d+)\.", name)
        if m:
            experts.setdefault(int(m.group(1)), {})[name.replace(m.group(0), ".mlp.expert.")] = tensor
    sets = [experts[e] for e in sorted(experts)]
    return [ffn_distance(sets[a], sets[b]) for a in range(len(sets)) for b in range(a + 1, len(sets))]


def _diversity(report: dict, key: str, run: Path) -> str:
    """Closest and farthest pair of routed experts (rel. L2) and, for the run's main model, the mean load CV of
    its routers. DMU's pairs include the base (expert 0); the others' are read from their saved weights."""
    if key == "dmu" and "expert_distance" in report:
        d = report["expert_distance"]
        pairs = [d[a][b] for a in range(len(d)) for b in range(a + 1, len(d))]
    elif key in report.get("weight_distances", {}):  # an archived run (its weights are not on disk)
        pairs = report["weight_distances"][key]
    else:
        pairs = _weight_distances(_model_dir(report, key, run)) if key in MODEL_DIRS else []
    if not pairs:
        return "–"
    main = report.get("construction", "dmu") == key
    cv = [u["load_cv"] for u in report.get("expert_usage") or []] if main else []
    cv_txt = f"; load CV {statistics.mean(cv):.3f}" if cv else ""
    return f"{100 * min(pairs):.1f}-{100 * max(pairs):.1f}%{cv_txt}"


def _values(runs: Path, prefix: str, where: Callable[[Path, int], Path], key: str, also: str | None
            ) -> tuple[list[float], list[float], dict | None, str]:
    """One row's per-seed scores, margins to the same seed's best baseline, seed-0 costs and diversity."""
    main = _main(prefix)
    scores, margins, cost, div = [], [], None, "–"
    for s in SEEDS:
        rep, base_rep = _report(where(runs, s)), _report(main(runs, s))
        if rep is None or base_rep is None or _score(rep, key, also) is None:
            continue
        scores.append(_score(rep, key, also))
        best = _best_baseline(base_rep, also)
        if best is not None:
            margins.append(scores[-1] - best)
        cost = cost or rep.get("costs", {}).get(key)
        if div == "–":
            div = _diversity(rep, key, where(runs, s))
    return scores, margins, cost, div


def table(runs: Path, prefix: str, also: str | None = None) -> str:
    head = ("| model | n | mean R@1 | − best baseline (same seed) | train samples | train TFLOPs | "
            "MFLOPs / image, caption | experts apart; load CV (first seed run) |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for label, where, key in rows_for(prefix):
        scores, margins, c, div = _values(runs, prefix, where, key, also)
        if not scores:
            continue
        cost_cells = (f"{c['train_samples']:,} | {c['train_flops'] / 1e12:.1f} | "
                      f"{c['image_flops'] / 1e6:.1f}, {c['caption_flops'] / 1e6:.1f}") if c else "– | – | –"
        lines.append(f"| {label} | {len(scores)} | {mean_std(scores)} | {mean_std(margins, signed=True)} | {cost_cells} | {div} |")
    return "\n".join(lines) + "\n"


# issue 16's targets: (column, corpus prefix, also_val key, the margin to the best baseline a construction needs)
TARGETS = (("default corpus", "dmu", None, 2.0), ("muted corpus", "muted", None, 2.0),
           ("adaptation: new domain", "adapt", None, -1.0), ("adaptation: old domain", "adapt", "old", 5.0))


def target_table(runs: Path) -> str:
    """Every construction's margin to the same seed's best baseline in each of issue 16's scenarios, against the
    target; "yes" only where the mean over the seeds measured reaches it."""
    labels: dict[str, None] = {}
    for _, prefix, _, _ in TARGETS:
        for label, _, key in rows_for(prefix):
            if key not in ("base", "upcycle", "dense_ft") and not label.startswith("MCL stage"):
                labels.setdefault(label)
    head = ("| construction | " + " | ".join(f"{c} (target {t:+.0f})" for c, _, _, t in TARGETS)
            + " | adaptation: both targets |")
    lines = [head, "|---|" + "---|" * (len(TARGETS) + 1)]
    for label in labels:
        cells, adapt_met = [], []
        for column, prefix, also, target in TARGETS:
            row = next(((w, k) for lab, w, k in rows_for(prefix) if lab == label), None)
            margins = _values(runs, prefix, *row, also)[1] if row else []
            met = "yes" if margins and statistics.mean(margins) >= target else "no"
            cells.append(f"{mean_std(margins, signed=True)} (n={len(margins)}, {met})" if margins else "not run")
            if column.startswith("adaptation") and margins:
                adapt_met.append(met == "yes")
        both = "not run" if not adapt_met else ("yes" if len(adapt_met) == 2 and all(adapt_met) else "no")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {both} |")
    return "\n".join(lines) + "\n"


def sweep_table(runs: Path) -> str:
    """Seed 0's learning-rate sweep, scored on the dev set (synth seed 1) that picks, and on the validation set."""
    sweep = runs / "sweep"
    centre = sweep / "centre"  # every model at its pre-sweep lr
    points = [("DMU router FT", "dmu", {1e-3: centre}, "router"),
              ("MCL stages (DMU)", "dmu", {1e-4: centre}, "mcl"),
              ("baseline: upcycle", "upcycle", {1e-4: centre}, "upcycle"),
              ("baseline: dense_ft", "dense_ft", {1e-4: centre}, "dense"),
              ("Drop-Upcycling r=0.5", "drop_upcycle", {}, "drop"),
              ("Drop-Upcycling r=0.25", "drop_upcycle", {}, "drop_r0.25")]
    for _, _, by_lr, name in points:  # every runs/sweep/NAME_lrX point there is, beside the centre points above
        archived = [runs / k for k in ARCHIVE if k.startswith(f"sweep/{name}_lr")]
        for d in [*sweep.glob(f"{name}_lr*"), *archived]:
            point = re.fullmatch(rf"{re.escape(name)}_lr([0-9.e+-]+)", d.name)  # not NAME_lrX_rerun: a repeat
            if point:
                by_lr.setdefault(float(point.group(1)), d)
    lines = ["| trained model | lr | dev mean R@1 (picks) | val mean R@1 |", "|---|---|---|---|"]
    for label, key, by_lr, _ in points:
        scored = []
        for lr, path in sorted(by_lr.items()):
            rep = _report(path)
            if rep is None or _score(rep, key, None) is None:
                continue
            scored.append((lr, _score(rep, key, "dev"), _score(rep, key, None)))
        with_dev = [p for p in scored if p[1] is not None]
        best = max(with_dev, key=lambda p: p[1])[0] if len(with_dev) > 1 else None  # one point picks nothing
        for lr, dev, val in scored:
            mark = " **(best)**" if lr == best else ""
            lr_txt = f"{lr:.0e}".replace("e-0", "e-")
            lines.append(f"| {label} | {lr_txt}{mark} | {'–' if dev is None else f'{dev:.1f}'} | {val:.1f} |")
    return "\n".join(lines) + "\n"


def retention_table(runs: Path) -> str:
    """The adaptation runs: the new domain (their validation set) and the old one (data.also_val.old)."""
    new, old = table(runs, "adapt").splitlines(), table(runs, "adapt", also="old").splitlines()
    if len(new) <= 2:
        return "(no adaptation runs)\n"
    return ("New domain (muted corpus):\n\n" + "\n".join(new) + "\n\nOld domain (default corpus, retention):\n\n"
            + "\n".join(old) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--out")
    ap.add_argument("--archive", help="JSON file of slim reports: read for runs missing here, then updated")
    args = ap.parse_args()
    runs = Path(args.runs)
    RUNS_ROOT[0] = runs
    if args.archive:
        if Path(args.archive).exists():
            ARCHIVE.update(json.loads(Path(args.archive).read_text()))
        archive(runs, Path(args.archive))
    text = (f"# Study tables (generated: `python bench/study_tables.py {' '.join(sys.argv[1:])}`)\n\n"
            "## Against issue 16's targets (margin to the same seed's best baseline, mean ± std)\n\n"
            + target_table(runs) + "\n## Learning-rate sweep (seed 0, default corpus)\n\n" + sweep_table(runs)
            + "\n## Default corpus\n\n" + table(runs, "dmu")
            + "\n## Muted corpus (its own base)\n\n" + table(runs, "muted")
            + "\n## Adaptation: base-tiny fine-tuned on the muted corpus\n\n" + retention_table(runs))
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
