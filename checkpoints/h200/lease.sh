#!/usr/bin/env bash
# One time-boxed GPU lease of the demo-model run (this workplace's `device` tool; any CUDA machine will do).
# The demo data are rebuilt from their seeds, the run resumes from checkpoints/h200/state.pt (the run checks that
# the training slices are the same by their fingerprint), trains until TRAIN_END seconds, then works down a list
# ordered by what matters most, so a lease that runs short loses the least:
#   1. calibration (fast, full) -> $OUT/anofpdm.pt, $OUT/state.pt (as soon as they exist)
#   2. evaluation of the AnoFPDM variants (DDIM fast / full, their S_te maps) beside the FLAIR baseline on the
#      6 test cases of the README's tables: whether the network can ship (#4), and #6's full-mode figures
#   3. verdict recall by tumour size, 4. quality against cost (PNG), 5. verdicts with TF32 on and off.
# The network baselines (AnoDDPM, CFG) are left to the CPU, where they take minutes per case, not hours.
# Everything else is bundled into $OUT/lease.tar after each stage (the device tool returns at most 8 files;
# the tar is replaced atomically, so a lease killed mid-way still returns the last bundle):
#   loss.csv loss.png figures.txt quality_vs_cost.png evaluation/{results.md,results.json,cases/,overlays/}
#
#   bash checkpoints/h200/lease.sh 2>&1 | tee $OUT/log.txt        # from the repository root, wheels in .whl/
#
# The first lease (2026-11-28, H200) ran an earlier form: data 100 s, 5127 iterations in 279 s, calibration of
# four modes 120 s, latency benchmark, and no time was left for the evaluation.
set -uo pipefail
END=${END:-585}            # seconds after start by which everything must be done
TRAIN_END=${TRAIN_END:-360}
PY=${PY:-python3}
left() { echo $(( END - SECONDS > 1 ? END - SECONDS : 1 )); }
if compgen -G ".whl/*.whl" > /dev/null; then  # monai, nibabel, nilearn where the image lacks them
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD/lib:/tmp/site PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export WORK=${WORK:-/tmp/demo} ANOFPDM="$PY -m anofpdm.cli"
export CASES=${CASES:-80} BATCH=${BATCH:-256} LR=${LR:-5e-4} EMA=${EMA:-0.999} CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-2000}
export ITERATIONS=${ITERATIONS:-15000} LR_DECAY_FROM=${LR_DECAY_FROM:-12982}   # the run's planned end and its decay
NUM_WORKERS=${NUM_WORKERS:-4}
shm_mb=$(df -m --output=size /dev/shm 2>/dev/null | tail -1)
(( ${shm_mb:-0} >= 1024 )) || NUM_WORKERS=0   # DataLoader workers hand batches over through /dev/shm
export NUM_WORKERS INFER_BATCH=${INFER_BATCH:-512}
export CALIBRATION_MODES=${CALIBRATION_MODES:-fast,full} CALIBRATION_SLICES=${CALIBRATION_SLICES:-1000}
export EVAL_CASES=${EVAL_CASES:-6}
export EVAL_METHODS=${EVAL_METHODS:-anofpdm-ddim-fast,anofpdm-ddim-full,anofpdm-ste-fast,anofpdm-ste-full,flair-threshold}
RESULTS=$WORK/lease
export EVAL_OUT=$RESULTS/evaluation
mkdir -p "$RESULTS"
publish() { tar -cf "$OUT/lease.tar.part" -C "$RESULTS" . && mv "$OUT/lease.tar.part" "$OUT/lease.tar"; }
nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 | tail -1
env | grep -E '^(CASES|BATCH|LR|LR_DECAY_FROM|ITERATIONS|EMA|NUM_WORKERS|INFER_BATCH|CALIBRATION_MODES|EVAL_CASES|EVAL_METHODS)=' | sort
if [[ ! -f $WORK/run/state.pt && -f checkpoints/h200/state.pt ]]; then
    mkdir -p "$WORK/run" && cp checkpoints/h200/state.pt checkpoints/h200/loss.csv "$WORK/run/"
fi
echo "[$SECONDS s] data"
STAGES=data bash scripts/train_demo_model.sh
limit=$($PY -c "print(max(0.5, ($TRAIN_END - $SECONDS) / 60))")
echo "[$SECONDS s] train for $limit min"
TIME_LIMIT_MIN=$limit STAGES=train,calibrate bash scripts/train_demo_model.sh
cp "$WORK/anofpdm.pt" "$WORK/run/state.pt" "$OUT/"
cp "$WORK/run/loss.csv" "$WORK/run/loss.png" "$RESULTS/" && publish

echo "[$SECONDS s] evaluate" | tee -a "$RESULTS/figures.txt"
timeout "$(( $(left) > 100 ? $(left) - 60 : $(left) ))" env STAGES=evaluate bash scripts/train_demo_model.sh
publish

echo "[$SECONDS s] verdict recall by tumour size" | tee -a "$RESULTS/figures.txt"
timeout 40 $PY benchmarks/verdict_by_tumour_size.py --model "$WORK/anofpdm.pt" --data "$WORK/slices" \
    --batch-size "$INFER_BATCH" >> "$RESULTS/figures.txt" 2>&1
publish

echo "[$SECONDS s] quality against cost" | tee -a "$RESULTS/figures.txt"
timeout "$(left)" $PY benchmarks/quality_vs_cost.py --model "$WORK/anofpdm.pt" --data "$WORK/cases" \
    --prepared "$WORK/slices" --cases 4 --settings 30:4,60:2,30:none,10:none --batch-size "$INFER_BATCH" \
    --out "$RESULTS/quality_vs_cost.png" >> "$RESULTS/figures.txt" 2>&1
publish

# The first lease's fast-mode verdicts differed between the H200 and the CPU; most of it was the batch-wide early
# stop (fixed since). What may be left between devices is arithmetic: TF32 convolutions (PyTorch's default) or not.
echo "[$SECONDS s] verdicts by device and batch, TF32 on and off" | tee -a "$RESULTS/figures.txt"
consistency=(benchmarks/verdict_consistency.py --model "$WORK/anofpdm.pt" --data "$WORK/slices" --slices 128
             --settings "cuda:$INFER_BATCH,cuda:32,cpu:16")
timeout "$(left)" $PY "${consistency[@]}" >> "$RESULTS/figures.txt" 2>&1
NVIDIA_TF32_OVERRIDE=0 timeout "$(left)" $PY "${consistency[@]/cpu:16/cuda:16}" >> "$RESULTS/figures.txt" 2>&1
publish
echo "[$SECONDS s] done"
