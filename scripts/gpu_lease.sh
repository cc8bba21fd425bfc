#!/usr/bin/env bash
# One time-boxed GPU lease that trains the next demo model for brains it has not seen (#30), with the recipe the CPU
# cannot run at scale: histogram-standardised slices, `train --augment`, the lowest-validation-loss step kept. It
# then calibrates it and evaluates it beside the shipped model, in-domain and on the shifted domain
# (docs/generalisation.md). Stages, ordered so that a lease that runs short loses the least:
#   1. data: training-domain cases and slices (scripts/train_demo_model.sh), the shifted test cases
#   2. training for at most TRAIN_MIN minutes (resumable: run/state.pt is bundled)
#   3. calibration (fast, fast-ddpm) of the best step
#   4. evaluation of the new and the shipped model on the in-domain test cases and the shifted cases
# Everything is bundled into $OUT/lease.tar after each stage (the device tool returns at most 8 files; the tar is
# replaced atomically, so a lease killed mid-way still returns the last bundle):
#   figures.txt run/{state.pt,model.pt,best.pt,loss.csv,validation.csv} anofpdm.pt evaluation*/results.{md,json}
#
#   bash scripts/gpu_lease.sh 2>&1 | tee $OUT/log.txt        # from the repository root, wheels in .whl/ (docs/training.md)
#
# The demo model behind model/anofpdm.pt was trained by an earlier form of this script (5127 iterations in 279 s on
# an H200, 2026-11-28) and then on the CPU (docs/training.md).
set -uo pipefail
END=${END:-570}            # seconds after start by which everything must be done
TRAIN_MIN=${TRAIN_MIN:-5}  # minutes of training in this lease
PY=${PY:-python3}
left() { echo $(( END - SECONDS > 1 ? END - SECONDS : 1 )); }
source scripts/lease_packages.sh  # monai, nibabel, nilearn, SimpleITK where the image lacks them
export PYTHONPATH=$PWD/lib:/tmp/site PYTHONUNBUFFERED=1 MPLBACKEND=Agg TQDM_DISABLE=1
export WORK=${WORK:-/tmp/demo} ANOFPDM="$PY -m anofpdm.cli" CASES=${CASES:-80} SHIFTED_CASES=${SHIFTED_CASES:-12}
export PRESET=${PRESET:-cpu} ITERATIONS=${ITERATIONS:-15000} BATCH=${BATCH:-256} LR=${LR:-5e-4} EMA=${EMA:-0.999}
export VALIDATE_EVERY=${VALIDATE_EVERY:-500} CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-500} NUM_WORKERS=${NUM_WORKERS:-4}
export INFER_BATCH=${INFER_BATCH:-512} EVAL_CASES=${EVAL_CASES:-16} CALIBRATION_MODES=${CALIBRATION_MODES:-fast,fast-ddpm}
METHODS=${METHODS:-anofpdm-ddim-fast,anofpdm-volume-fast,flair-threshold,flair-zscore}
MODELS=${MODELS:-new,shipped}   # which models to evaluate: the one trained here, model/anofpdm.pt
RESULTS=$WORK/lease
mkdir -p "$RESULTS"
publish() {
    for f in run/state.pt run/model.pt run/best.pt run/loss.csv run/validation.csv anofpdm.pt; do
        [[ -f $WORK/$f ]] && mkdir -p "$RESULTS/$(dirname "$f")" && cp "$WORK/$f" "$RESULTS/$f"
    done
    tar -cf "$OUT/lease.tar.part" -C "$RESULTS" . && mv "$OUT/lease.tar.part" "$OUT/lease.tar"
}
nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 | tail -1
echo "CASES=$CASES ITERATIONS=$ITERATIONS BATCH=$BATCH TRAIN_MIN=$TRAIN_MIN METHODS=$METHODS" | tee -a "$RESULTS/figures.txt"

echo "[$SECONDS s] data" | tee -a "$RESULTS/figures.txt"
STAGES=data bash scripts/train_demo_model.sh || exit 1
$ANOFPDM synth --domain shifted --out "$WORK/shifted" --cases "$SHIFTED_CASES" --seed 2026 --healthy-fraction 0.25 \
    --workers "$(nproc)" > /dev/null || exit 1

echo "[$SECONDS s] train" | tee -a "$RESULTS/figures.txt"
TIME_LIMIT_MIN=$TRAIN_MIN STAGES=train bash scripts/train_demo_model.sh >> "$RESULTS/figures.txt" 2>&1
publish

echo "[$SECONDS s] calibrate the best step" | tee -a "$RESULTS/figures.txt"
best=$WORK/run/best.pt; [[ -f $best ]] || best=$WORK/run/model.pt
cp "$best" "$WORK/anofpdm.pt"
timeout "$(left)" $ANOFPDM calibrate --model "$WORK/anofpdm.pt" --data "$WORK/slices" --split val \
    --modes "$CALIBRATION_MODES" --max-slices 1000 --batch-size "$INFER_BATCH" >> "$RESULTS/figures.txt" 2>&1
publish

for name in ${MODELS//,/ }; do
    model=$([[ $name == shipped ]] && echo model/anofpdm.pt || echo "$WORK/anofpdm.pt")
    echo "[$SECONDS s] evaluate the $name model, shifted domain" | tee -a "$RESULTS/figures.txt"
    timeout "$(left)" $ANOFPDM evaluate --model "$model" --data "$WORK/shifted" --methods "$METHODS" \
        --flair-quantile 0.97 --batch-size "$INFER_BATCH" --overlays 0 --out "$RESULTS/evaluation_shifted_$name" \
        >> "$RESULTS/figures.txt" 2>&1
    publish
    echo "[$SECONDS s] evaluate the $name model, in-domain test cases" | tee -a "$RESULTS/figures.txt"
    timeout "$(left)" $ANOFPDM evaluate --model "$model" --data "$WORK/cases" --prepared "$WORK/slices" --split test \
        --tune-split val --methods "$METHODS" --max-cases "$EVAL_CASES" --batch-size "$INFER_BATCH" --overlays 0 \
        --out "$RESULTS/evaluation_$name" >> "$RESULTS/figures.txt" 2>&1
    publish
done
echo "[$SECONDS s] done" | tee -a "$RESULTS/figures.txt"
