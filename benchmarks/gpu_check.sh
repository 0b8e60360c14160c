#!/usr/bin/env bash
# One-shot GPU check (under 8 minutes on one GPU): every family's demo on CUDA in bf16, AstroPT with
# --compile, a 1-GPU torchrun (NCCL) run, `fmb bench astropt --preset 095M` (MFU, peak memory) and the
# loader's rate; then one summary (summary.json + summary.md) by benchmarks/gpu_summary.py.
#
#   bash benchmarks/gpu_check.sh [OUT]                 # on a GPU machine, from the repository root
#   CHECK_MODE=cpu CHECK_FAMILIES=astropt bash benchmarks/gpu_check.sh OUT   # the same steps on CPU,
#       fp32, gloo, tiny (--compile is left out there: see the summary)
#   CHECK_STEPS="torchrun loader": only those steps (of: demo compile torchrun bench loader); the test
#       suite runs these two in CPU mode (the demos and `fmb bench` on CPU have their own tests)
#
# Every step runs under `timeout`, and a failing step is recorded, not fatal: the summary says
# which steps passed. Record the figures in docs/benchmarks.md with this command beside them.
set -u
OUT=${1:-gpu-check}
MODE=${CHECK_MODE:-gpu}
FAMILIES=${CHECK_FAMILIES:-"astropt astroclip specformer astrom3 astromodal aion"}
STEPS=" ${CHECK_STEPS:-demo compile torchrun bench loader} "
PYTHON=${PYTHON:-python}
mkdir -p "$OUT/logs"
: > "$OUT/steps.tsv"

if [ "$MODE" = gpu ]; then
    DEVICE=(--device cuda --set train.precision=bf16)
    DEMO_STEPS=40 BENCH_STEPS=10 LIMIT=150
    BENCH=(--preset 095M --batch-size 32 --set data.image_size=224 --set data.synthetic=256
           --set 'model.modalities=[{name: images, input_size: 768, patch_size: 16, loss_weight: 3.97}, {name: spectra, input_size: 10, patch_size: 10, loss_weight: 0.25}]')
    LOADER=(--data "$OUT/loader-data" --objects 512 --workers 0 1 2 4 8 --rounds 1 --epochs 2)
else
    DEVICE=(--device cpu --set train.precision=fp32)
    DEMO_STEPS=2 BENCH_STEPS=1 LIMIT=120
    TINY=(--set model.n_layer=1 --set model.n_head=2 --set model.n_embd=32 --set data.synthetic=40)
    BENCH=("${TINY[@]}" --batch-size 4)
    # the torchrun step's demo data (64 px)
    LOADER=(--data "$OUT/torchrun-astropt/data/data/train-00000-of-00001.parquet" --image-size 64 --batch 8
            --workers 0 1 --rounds 1 --epochs 2)
fi
COMMON=(--set train.max_steps=$DEMO_STEPS --set train.eval_at_start=false --set train.checkpoint.every=1000)

step() {  # step NAME COMMAND...: run it under the time limit, log it, record its exit code and time
    local name=$1 start code
    shift
    case "$STEPS" in *" ${name%%-*} "*) ;; *) return ;; esac  # demo-astropt is in group "demo"
    start=$EPOCHREALTIME
    timeout "$LIMIT" "$@" > "$OUT/logs/$name.log" 2>&1
    code=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$code" "$(awk "BEGIN {print $EPOCHREALTIME - $start}")" "$*" >> "$OUT/steps.tsv"
    echo "$name: exit $code"
}

for family in $FAMILIES; do
    extra=()
    if [ "$MODE" != gpu ]; then  # tiny model and data for astropt; the other families' demos as they are
        if [ "$family" = astropt ]; then extra=("${TINY[@]}" --batch-size 4); fi
    fi
    step "demo-$family" "$PYTHON" -m fmb retrain "$family" --demo --out "$OUT/demo-$family" --no-progress \
        "${DEVICE[@]}" "${COMMON[@]}" "${extra[@]}"
done
if [ "$MODE" = gpu ]; then
    step compile-astropt "$PYTHON" -m fmb bench astropt --compile --steps "$BENCH_STEPS" "${DEVICE[@]}" \
        --json "$OUT/compile-astropt.json"
fi
step torchrun-astropt "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 -m fmb retrain astropt \
    --demo --out "$OUT/torchrun-astropt" --no-progress "${DEVICE[@]}" "${COMMON[@]}" ${TINY[@]+"${TINY[@]}"}
step bench-astropt "$PYTHON" -m fmb bench astropt --steps "$BENCH_STEPS" "${DEVICE[@]}" "${BENCH[@]}" \
    --json "$OUT/bench-astropt.json"
step loader "$PYTHON" benchmarks/loader_bench.py "${LOADER[@]}" --json "$OUT/loader.json"

"$PYTHON" benchmarks/gpu_summary.py "$OUT" --mode "$MODE"
