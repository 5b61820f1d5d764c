#!/usr/bin/env bash
# What only a GPU shows: device placement, bf16, a real-width model. From a fresh clone on a machine with one
# CUDA GPU: installs (if .venv is absent), runs the tests marked `cuda` (bf16 dispatch and router against fp32,
# one MCL stage on the GPU and its resume, kill and resume of the pipeline on the GPU), then the smoke DMU
# pipeline on the GPU in bf16 with ViT-B/32 (random initialisation), and checks that the saved model
# re-evaluates to the report's numbers. One line per check; exit status 1 if any failed.
# Without a GPU it says so in one line and runs its CPU parts (the same pipeline check, in bf16 autocast on the
# CPU, with the tiny shipped base); CI runs that (tests/test_gpu_check.py).
#   bash bench/gpu_check.sh [OUT_DIR]        (PYTHON=... to use another interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
T0=$(date +%s)
FAILED=0
check() {  # check NAME STATUS DETAIL
    printf 'gpu_check: %-34s %-4s %s (%ds)\n' "$1" "$2" "$3" $(( $(date +%s) - T0 ))
    [ "$2" = "ok" ] || FAILED=1
}

if [ -z "${PYTHON:-}" ]; then
    if [ ! -x .venv/bin/python ]; then
        if python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' >"$OUT/install.log" 2>&1; then
            check install ok "fresh .venv ($OUT/install.log)"
        else
            check install FAIL "see $OUT/install.log"; exit 1
        fi
    fi
    PYTHON=.venv/bin/python
fi
BIN=$(dirname "$PYTHON")
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

GPU=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>/dev/null)
if [ -n "$GPU" ]; then
    check device ok "$GPU, torch $("$PYTHON" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
    if "$PYTHON" -m pytest -q -m cuda tests >"$OUT/cuda_tests.log" 2>&1; then
        check "cuda tests" ok "$(tail -1 "$OUT/cuda_tests.log")"
    else
        check "cuda tests" FAIL "$(tail -1 "$OUT/cuda_tests.log") (log: $OUT/cuda_tests.log)"
    fi
    LAUNCH=(--config_file recipes/accelerate/gpu1_bf16.yaml)
    CONFIG=recipes/configs/smoke_vitb32.yaml
    WHAT="ViT-B-32-quickgelu, 1 GPU, bf16"
else
    echo "gpu_check: no CUDA GPU here; running the CPU parts only (tiny base, bf16 autocast on the CPU)"
    LAUNCH=(--num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no)
    CONFIG=recipes/configs/smoke.yaml
    WHAT="moeclip-tiny, CPU, bf16"
fi

RUN="$OUT/dmu"
DATA="$OUT/data"
rm -rf "$RUN"
if "$BIN/accelerate" launch "${LAUNCH[@]}" recipes/dmu.py --config "$CONFIG" output_dir="$RUN" \
        data.train="$DATA/train.csv" data.val="$DATA/val.csv" data.synth.out="$DATA" >"$OUT/pipeline.log" 2>&1; then
    check "smoke DMU pipeline" ok "$WHAT: $("$PYTHON" -c "import json,sys; r=json.load(open(sys.argv[1])); print(', '.join(f'{k} {100*v[\"mean_R@1\"]:.1f}' for k,v in r['models'].items()), '(mean R@1)')" "$RUN/report.json")"
else
    check "smoke DMU pipeline" FAIL "$WHAT (log: $OUT/pipeline.log)"
fi

if [ -f "$RUN/report.json" ]; then
    EVAL_BATCH=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['config']['eval_batch'])" "$RUN/report.json")
    if "$BIN/moeclip" eval --model "$RUN/model" --data "$DATA/val.csv" --precision bf16 --batch-size "$EVAL_BATCH" \
            --out "$OUT/reeval.json" >"$OUT/reeval.log" 2>&1; then
        VERDICT=$("$PYTHON" - "$RUN/report.json" "$OUT/reeval.json" <<'PY'
import json, sys
report, again = (json.load(open(p)) for p in sys.argv[1:3])
want = report["models"]["dmu"]
keys = [k for k in want if "_R@" in k]
# the same kernels on the same batches: equal; a GPU may sum in another order, so allow one item of slack
slack = 1.0 / min(want["num_images"], want["num_captions"])
worst = max(abs(want[k] - again[k]) for k in keys)
print(("ok" if worst <= slack + 1e-9 else "FAIL") + f" largest difference {worst:.4f} over {len(keys)} recalls "
      f"(one item = {slack:.4f}); mean R@1 report {100 * want['mean_R@1']:.2f}, re-eval {100 * again['mean_R@1']:.2f}")
PY
)
        check "saved model re-evaluates" "${VERDICT%% *}" "${VERDICT#* }"
    else
        check "saved model re-evaluates" FAIL "moeclip eval failed (log: $OUT/reeval.log)"
    fi
fi
echo "gpu_check: done in $(( $(date +%s) - T0 )) s, $([ $FAILED = 0 ] && echo 'all checks passed' || echo 'SOME CHECKS FAILED')"
exit $FAILED
