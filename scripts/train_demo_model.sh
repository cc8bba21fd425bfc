#!/usr/bin/env bash
# Make the demo model from nothing: synthetic cases -> training slices -> classifier-free-guidance training
# -> label-free calibration (fast and full modes) -> evaluation on the held-out test cases, and on cases of the
# shifted domain (anatomy, contrast and grids the training never sees: docs/generalisation.md).
#
# Every setting is an environment variable (model/README.md records those of the shipped model). Data stages
# are skipped when their output exists, and training and evaluation resume where they stopped
# (TIME_LIMIT_MIN ends a session saved; ITERATIONS is the planned length of the whole run).
#
#   WORK=/tmp/demo TIME_LIMIT_MIN=5 scripts/train_demo_model.sh        # one session of at most 5 minutes
#   ANOFPDM="python3 -m anofpdm.cli" ...                              # without the console script
#   STAGES=evaluate scripts/train_demo_model.sh                       # some of: data,train,calibrate,evaluate,shifted
set -euo pipefail

WORK=${WORK:-runs/demo}
ANOFPDM=${ANOFPDM:-anofpdm}
CASES=${CASES:-160}
SYNTH_SEED=${SYNTH_SEED:-1000}
TUMOUR_VOLUME_ML=${TUMOUR_VOLUME_ML:-}   # LOW,HIGH mL for anofpdm synth (default: its 8,250); other data cannot resume a run
BENIGN_FINDINGS=${BENIGN_FINDINGS:-basic}   # anofpdm synth --benign-findings of the training cases: basic or clinical
SIZE=${SIZE:-64}
INTENSITY=${INTENSITY:-standardised}   # prepare --intensity: standardised (histogram landmarks) or percentile
WORKERS=${WORKERS:-$(nproc)}
PRESET=${PRESET:-cpu}
ITERATIONS=${ITERATIONS:-30000}
BATCH=${BATCH:-64}
NUM_WORKERS=${NUM_WORKERS:-0}
AUGMENT=${AUGMENT:-1}   # 1: train --augment (random spatial and intensity augmentation); empty: none
INITIAL_WEIGHTS=${INITIAL_WEIGHTS:-}   # an exported model to fine-tune from (train --initial-weights); empty: random
LR=${LR:-3e-4}
LR_DECAY_FROM=${LR_DECAY_FROM:-}   # iteration from which the learning rate falls linearly to 0 at ITERATIONS
VALIDATE_EVERY=${VALIDATE_EVERY:-}   # iterations between validation losses; the lowest's network is run/best.pt
EMA=${EMA:-0.999}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-500}
TIME_LIMIT_MIN=${TIME_LIMIT_MIN:-}
BF16=${BF16:-}
CALIBRATION_SLICES=${CALIBRATION_SLICES:-1000}
CALIBRATION_MODES=${CALIBRATION_MODES:-fast,full}
INFER_BATCH=${INFER_BATCH:-8}   # slices per network batch in calibration and evaluation: 8 serves on 2 CPU cores (32: at most ~8 % faster, for ~0.7 GB more); ~512 on a GPU
EVAL_CASES=${EVAL_CASES:-16}
EVAL_METHODS=${EVAL_METHODS:-anofpdm-ddim-fast,anofpdm-volume-fast,anofpdm-ddim-full,anofpdm-ste-fast,anofpdm-ste-full,anoddpm-reconstruction,cfg-ddim,flair-threshold,flair-zscore}
EVAL_OUT=${EVAL_OUT:-$WORK/evaluation}
SHIFTED_CASES=${SHIFTED_CASES:-12}   # shifted-domain test cases (never trained, calibrated or selected on)
SHIFTED_SEED=${SHIFTED_SEED:-2026}
SHIFTED_METHODS=${SHIFTED_METHODS:-anofpdm-ddim-fast,anofpdm-volume-fast,flair-threshold,flair-zscore}
FLAIR_QUANTILE=${FLAIR_QUANTILE:-0.97}   # the FLAIR baseline's brain quantile on the shifted cases (not tuned there)
STAGES=${STAGES:-data,train,calibrate,evaluate,shifted}

run() { echo "+ $*" >&2; "$@"; }
stage() { [[ ,$STAGES, == *,$1,* ]]; }
for name in ${STAGES//,/ }; do
    [[ $name =~ ^(data|train|calibrate|evaluate|shifted)$ ]] || { echo "unknown stage '$name' in STAGES" >&2; exit 2; }
done

if stage data && [[ ! -f $WORK/cases/manifest.json ]]; then
    synth_args=(--out "$WORK/cases" --cases "$CASES" --seed "$SYNTH_SEED" --workers "$WORKERS"
                --benign-findings "$BENIGN_FINDINGS")
    [[ -n $TUMOUR_VOLUME_ML ]] && synth_args+=(--tumour-volume-ml "$TUMOUR_VOLUME_ML")
    run $ANOFPDM synth "${synth_args[@]}"
fi
if stage data && [[ ! -f $WORK/slices/manifest.json ]]; then
    run $ANOFPDM prepare --data "$WORK/cases" --out "$WORK/slices" --sequences flair,t2 --size "$SIZE" --seed 0 \
        --workers "$WORKERS" --intensity "$INTENSITY"
fi

if stage train; then
    train_args=(--data "$WORK/slices" --preset "$PRESET" --out "$WORK/run" --batch-size "$BATCH"
                --iterations "$ITERATIONS" --lr "$LR" --ema-decay "$EMA" --checkpoint-every "$CHECKPOINT_EVERY"
                --num-workers "$NUM_WORKERS" --seed 0 --no-progress)
    [[ -f $WORK/run/state.pt ]] && train_args+=(--resume)
    [[ -n $LR_DECAY_FROM ]] && train_args+=(--lr-decay-from "$LR_DECAY_FROM")
    [[ -n $VALIDATE_EVERY ]] && train_args+=(--validate-every "$VALIDATE_EVERY")
    [[ -n $TIME_LIMIT_MIN ]] && train_args+=(--time-limit-min "$TIME_LIMIT_MIN")
    [[ -n $BF16 ]] && train_args+=(--bf16)
    [[ -n $AUGMENT ]] && train_args+=(--augment)
    [[ -n $INITIAL_WEIGHTS ]] && train_args+=(--initial-weights "$INITIAL_WEIGHTS")
    run $ANOFPDM train "${train_args[@]}"
fi

# calibration and evaluation describe the weights as they are now: a finished run or a session's progress
if stage calibrate; then
    cp "$WORK/run/model.pt" "$WORK/anofpdm.pt"
    run $ANOFPDM calibrate --model "$WORK/anofpdm.pt" --data "$WORK/slices" --split val --modes "$CALIBRATION_MODES" \
        --max-slices "$CALIBRATION_SLICES" --batch-size "$INFER_BATCH"
fi
if stage evaluate; then
    run $ANOFPDM evaluate --model "$WORK/anofpdm.pt" --data "$WORK/cases" --prepared "$WORK/slices" --split test \
        --tune-split val --methods "$EVAL_METHODS" --max-cases "$EVAL_CASES" --batch-size "$INFER_BATCH" \
        --overlays 2 --out "$EVAL_OUT" --resume
fi
if stage shifted; then
    if [[ ! -f $WORK/shifted/manifest.json ]]; then
        run $ANOFPDM synth --domain shifted --out "$WORK/shifted" --cases "$SHIFTED_CASES" --seed "$SHIFTED_SEED" \
            --healthy-fraction 0.25 --workers "$WORKERS"
    fi
    run $ANOFPDM evaluate --model "$WORK/anofpdm.pt" --data "$WORK/shifted" --methods "$SHIFTED_METHODS" \
        --flair-quantile "$FLAIR_QUANTILE" --batch-size "$INFER_BATCH" --overlays 2 --out "$WORK/evaluation_shifted" \
        --resume
fi
