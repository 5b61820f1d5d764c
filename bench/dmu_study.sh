#!/bin/bash
# The runs behind docs/results.md: DMU (construction=dmu, with both baselines) on two corpora and in the adaptation
# scenario x 3 seeds, every other construction on each seed's own MCL stages, the expert-count and top-k
# ablations, and the published recipe. The README's command (construction=drop_upcycle, the default) writes
# runs/dmu; the study's DMU runs are runs/dmu_s*. Every run resumes, so re-running skips what is done. A full DMU
# run takes ~13-15 min on 2 CPU cores, a construction on reused stages ~3-7; run one at a time (on this machine
# two runs side by side go no faster than one after the other).
#
#   bash bench/dmu_study.sh [default|muted|ablations|constructions|adaptation|wise_ft|novelty_posthoc|sweep|variants|published|tables]...   (no argument: all)
#   SEEDS="0" bash bench/dmu_study.sh constructions    (only seed 0's)
set -euo pipefail
cd "$(dirname "$0")/.."
# every study run is DMU-based (construction=dmu): the other constructions are switches on top of its stages
RECIPE="accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no recipes/dmu.py"
LAUNCH="$RECIPE construction=dmu"
MUTED="base=runs/base-muted/model data.train=data/synth_muted/train.csv data.val=data/synth_muted/val.csv
       data.synth.out=data/synth_muted data.synth.preset=muted"
ADAPT="data.train=data/synth_muted/train.csv data.val=data/synth_muted/val.csv data.synth.out=data/synth_muted
       data.synth.preset=muted data.also_val.old=data/synth/val.csv"
NO_BASELINES="baselines.upcycle=false baselines.dense_ft=false baselines.dmu_router_experts=false"

dev_set() { [ -f data/synth_dev/val.csv ] || moeclip synth --out data/synth_dev --train 1 --val 2000 --seed 1; }

default() {  # DMU and both baselines per seed (plus the dev set, the sweep's held-out picker)
  dev_set
  for s in ${SEEDS:-0 1 2}; do $LAUNCH output_dir=runs/dmu_s$s seed=$s data.also_val.dev=data/synth_dev/val.csv; done
}

muted() {  # a base pre-trained on the muted corpus (colour washed out, patterns bold), then DMU and Drop-Upcycling
  pretrain_muted
  for s in ${SEEDS:-0 1 2}; do
    $LAUNCH $MUTED output_dir=runs/muted_s$s seed=$s baselines.dmu_router_experts=false
    $LAUNCH $MUTED output_dir=runs/con/muted_drop_s$s mcl_dir=runs/muted_s$s/mcl seed=$s $NO_BASELINES \
      baselines.drop_upcycle=true
  done
}

ablations() {  # DMU on the first 1 or 2 MCL stages (2 or 3 experts), and top-1 routing, per default seed
  for s in 0 1 2; do
    run=runs/dmu_s$s
    [ -f $run/report.json ] || continue
    for e in 2 3; do $LAUNCH output_dir=runs/abl/e${e}_s$s mcl_dir=$run/mcl mcl.num_experts=$e seed=$s $NO_BASELINES; done
    $LAUNCH output_dir=runs/abl/top1_s$s mcl_dir=$run/mcl upcycle.top_k=1 seed=$s $NO_BASELINES
  done
}

constructions() {  # issue #16's constructions on each default seed's own MCL stages (DMU's stages, reused):
  # the zero-initialised router (the old default), a shared expert beside the routed ones, Drop-Upcycling
  # (r = 0.5, trained like the upcycle baseline at the same budget), and cluster-specialist experts
  for s in ${SEEDS:-0 1 2}; do
    run=runs/dmu_s$s
    [ -f $run/report.json ] || continue
    $LAUNCH output_dir=runs/con/zero_router_s$s mcl_dir=$run/mcl upcycle.router_init_std=0.0 seed=$s $NO_BASELINES
    $LAUNCH output_dir=runs/con/shared_s$s mcl_dir=$run/mcl upcycle.shared_expert=true seed=$s $NO_BASELINES
    $LAUNCH output_dir=runs/con/drop_s$s mcl_dir=$run/mcl baselines.drop_upcycle=true seed=$s $NO_BASELINES
    # Drop-Upcycling beside the base's FFN, frozen and novelty-gated (added 2026-12-07; no MCL): what the
    # adaptation scenario's retention construction costs where nothing is new
    $RECIPE construction=drop_upcycle output_dir=runs/con/drop_novelty_s$s seed=$s $NO_BASELINES \
      upcycle.shared_expert=true upcycle.shared_gate=novelty construction_ft.freeze_shared=true
    # cluster specialists train their own experts (one partition each, same steps as an MCL stage)
    $LAUNCH output_dir=runs/con/specialists_s$s mcl.construction=specialists seed=$s $NO_BASELINES
  done
}

adaptation() {  # a general CLIP adapted to a new domain: base-tiny (pre-trained on the default corpus) trained on
  # the muted corpus, every model also evaluated on the default corpus's validation set (retention)
  [ -f data/synth/val.csv ] || moeclip synth --out data/synth
  # plus Drop-Upcycling and a shared expert (the base FFN kept beside the routed ones) on each seed's stages, and
  # Drop-Upcycling beside a frozen copy of the base's FFN
  for s in ${SEEDS:-0 1 2}; do
    $LAUNCH $ADAPT output_dir=runs/adapt_s$s seed=$s baselines.dmu_router_experts=false
    $LAUNCH $ADAPT output_dir=runs/con/adapt_drop_s$s mcl_dir=runs/adapt_s$s/mcl seed=$s $NO_BASELINES \
      baselines.drop_upcycle=true
    $LAUNCH $ADAPT output_dir=runs/con/adapt_shared_s$s mcl_dir=runs/adapt_s$s/mcl seed=$s $NO_BASELINES \
      upcycle.shared_expert=true
    # Drop-Upcycling with the base's FFN kept frozen beside its experts (no MCL: construction=drop_upcycle)
    $RECIPE construction=drop_upcycle $ADAPT output_dir=runs/con/adapt_drop_frozen_shared_s$s seed=$s \
      $NO_BASELINES upcycle.shared_expert=true construction_ft.freeze_shared=true
    # the same, with the shared expert's gate not learned but set by novelty (moeclip.moe.novelty, added
    # 2026-12-07): a sample unlike the training data goes through the base's FFNs
    $RECIPE construction=drop_upcycle $ADAPT output_dir=runs/con/adapt_drop_novelty_s$s seed=$s \
      $NO_BASELINES upcycle.shared_expert=true upcycle.shared_gate=novelty construction_ft.freeze_shared=true
    # its control: the same gate and frozen base FFN beside ONE routed expert (top-1, no re-drawn units), i.e.
    # dense FFN fine-tuning with the gate, on the same 1,050 steps (budget = router_ft steps when no MCL stage)
    $RECIPE construction=drop_upcycle $ADAPT output_dir=runs/con/adapt_dense_novelty_s$s seed=$s $NO_BASELINES \
      mcl.num_experts=1 router_ft.train.steps=1050 upcycle.top_k=1 upcycle.drop_ratio=0.0 \
      upcycle.shared_expert=true upcycle.shared_gate=novelty construction_ft.freeze_shared=true
  done
}

sweep() {  # the small learning-rate sweep (seed 0, default corpus): each trained model at 1/3x, 1x and 3x the lr
  # it had before the sweep (PRE), then one more 3x step at a time while the best sat at an edge (Drop-Upcycling
  # stopped at its edge, 3e-3, for time). Picked on a held-out dev set (synth seed 1), not on the validation set
  # the tables report. DMU's MCL stages are reused except at the stage-lr points. The winners are
  # recipes/configs/default.yaml's lrs; docs/results.md §1 has the table (bench/study_tables.py).
  dev_set
  local dev="data.also_val.dev=data/synth_dev/val.csv" only="baselines.dmu_router_experts=false"
  local PRE="mcl.train.lr=1e-4 router_ft.train.lr=1e-3 baselines.upcycle_finetune.train.lr=1e-4 baselines.dense_ft_lr=1e-4
             baselines.drop_upcycle_lr=null"
  local c=runs/sweep/centre
  $LAUNCH output_dir=$c seed=0 $PRE $dev   # the centre point: every model at its pre-sweep lr
  for lr in 1e-4 3e-4 3e-3; do $LAUNCH output_dir=runs/sweep/router_lr$lr mcl_dir=$c/mcl $PRE router_ft.train.lr=$lr $NO_BASELINES $dev; done
  reuse() {  # a baseline-only point keeps the centre's DMU model and evaluations instead of re-training them
    mkdir -p $1/evals; [ -d $1/model ] || cp -a $c/model $1/model
    cp -n $c/evals/{base,mcl_stage_?,dmu}.json $1/evals/; }
  for lr in 3e-5 3e-4 1e-3 3e-3 1e-2; do
    reuse runs/sweep/dense_lr$lr
    $LAUNCH output_dir=runs/sweep/dense_lr$lr mcl_dir=$c/mcl $PRE $only baselines.upcycle=false baselines.dense_ft_lr=$lr $dev
  done
  for lr in 3e-5 3e-4 1e-3 3e-3; do
    reuse runs/sweep/upcycle_lr$lr
    $LAUNCH output_dir=runs/sweep/upcycle_lr$lr mcl_dir=$c/mcl $PRE $only baselines.dense_ft=false \
      baselines.upcycle_finetune.train.lr=$lr $dev
  done
  for lr in 3e-4 1e-3; do $LAUNCH output_dir=runs/sweep/mcl_lr$lr $PRE mcl.train.lr=$lr $NO_BASELINES $dev; done
  for lr in 1e-4 3e-4 1e-3 3e-3; do  # Drop-Upcycling re-draws half its units
    reuse runs/sweep/drop_lr$lr
    $LAUNCH output_dir=runs/sweep/drop_lr$lr mcl_dir=$c/mcl $PRE $NO_BASELINES baselines.drop_upcycle=true \
      baselines.drop_upcycle_lr=$lr $dev
  done
  # added 2026-12-07: Drop-Upcycling past its edge (1e-2) and at r = 0.25, as the default construction (no MCL),
  # beside its 3e-3 pick on the same path (run twice: a check that a run repeats)
  for spec in lr3e-3:construction_ft.train.lr=3e-3 lr1e-2:construction_ft.train.lr=1e-2 \
              "r0.25_lr3e-3:construction_ft.train.lr=3e-3 upcycle.drop_ratio=0.25" lr3e-3_rerun:construction_ft.train.lr=3e-3; do
    $RECIPE construction=drop_upcycle output_dir=runs/sweep/drop_${spec%%:*} seed=0 $NO_BASELINES ${spec#*:} $dev
  done
}

novelty_posthoc() {  # the gate put on seed 2's dense_ft after the fact (nothing trained), and a held-out check (§4c)
  python bench/novelty_posthoc.py --base checkpoints/base-tiny --model dense_ft=runs/adapt_s2/baselines/dense_ft/model \
    --train data/synth_muted/train.csv --data new=data/synth_muted/val.csv old=data/synth/val.csv --seed 2 \
    --json docs/novelty_posthoc.json
  # retention on an old-domain set never looked at while the gate was designed (the dev set of `default`)
  dev_set
  python bench/novelty_heldout.py --data data/synth_dev/val.csv --json docs/novelty_heldout.json --model \
    base=checkpoints/base-tiny dense_ft_s2=runs/adapt_s2/baselines/dense_ft/model \
    upcycle_s2=runs/adapt_s2/baselines/upcycle/model drop_upcycle_s2=runs/con/adapt_drop_s2/baselines/drop_upcycle/model \
    $(for s in 0 1 2; do echo drop_novelty_s$s=runs/con/adapt_drop_novelty_s$s/model dense_novelty_s$s=runs/con/adapt_dense_novelty_s$s/model; done)
}

wise_ft() {  # WiSE-FT of every adapted model (bench/wise_ft.py, docs/results.md §4b), after `adaptation`
  for s in ${SEEDS:-0 1 2}; do
    python bench/wise_ft.py --label s$s --base checkpoints/base-tiny \
      --model dmu=runs/adapt_s$s/model upcycle=runs/adapt_s$s/baselines/upcycle/model \
              dense_ft=runs/adapt_s$s/baselines/dense_ft/model \
              drop_upcycle=runs/con/adapt_drop_s$s/baselines/drop_upcycle/model \
      --data new=data/synth_muted/val.csv old=data/synth/val.csv --json docs/wise_ft.json --out docs/wise_ft.md
  done
}

pretrain_muted() {  # the muted corpus's own base
  [ -f runs/base-muted/model/config.json ] || python recipes/pretrain.py output_dir=runs/base-muted \
    data.synth.out=data/synth_muted data.synth.preset=muted data.train=data/synth_muted/train.csv \
    data.val=data/synth_muted/val.csv
}

variants() {  # chained MCL stages, DMU only (the baselines do not depend on this switch: each seed's runs/dmu_s*)
  for s in ${SEEDS:-0 1 2}; do $LAUNCH output_dir=runs/var/start_prev_s$s mcl.start_from=previous seed=$s $NO_BASELINES; done
}

published() { $RECIPE --config recipes/configs/published.yaml; }  # construction: dmu is in the file

tables() {
  mkdir -p runs/tables
  agg() { local name=$1; shift; local have=(); for f in "$@"; do [ -f "$f" ] && have+=("$f"); done
          [ ${#have[@]} -gt 0 ] && python bench/aggregate_reports.py "${have[@]}" --out runs/tables/$name.md > /dev/null
          echo "runs/tables/$name.md (${#have[@]} report(s))"; }
  agg default runs/dmu_s{0,1,2}/report.json
  agg muted runs/muted_s{0,1,2}/report.json
  for a in e2 e3 top1; do agg abl_$a runs/abl/${a}_s{0,1,2}/report.json; done
  agg published runs/dmu_published/report.json
  agg start_prev runs/var/start_prev_s{0,1,2}/report.json
  for c in zero_router shared drop specialists drop_novelty muted_drop adapt_drop adapt_shared adapt_drop_frozen_shared \
           adapt_drop_novelty adapt_dense_novelty; do agg con_$c runs/con/${c}_s{0,1,2}/report.json; done
  agg adaptation runs/adapt_s{0,1,2}/report.json
  # issue 16's tables; the archive keeps every run's scores in the repo, since runs/ is not committed
  python bench/study_tables.py --out docs/study_tables.md --archive docs/study_runs.json > /dev/null
}

for step in "${@:-default muted ablations constructions adaptation wise_ft novelty_posthoc variants published tables}"; do
  for s in $step; do "$s"; done
done
