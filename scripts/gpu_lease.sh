#!/usr/bin/env bash
# One time-boxed GPU lease measuring the shipped model, model/anofpdm.pt (#6: the rows the 2-core CPU cannot make).
# The demo data are rebuilt from their seeds (the model card's commands), then a list ordered by what matters most
# is worked down, so a lease that runs short loses the least:
#   1. calibration of the full modes (full, full-ddpm) on all validation slices, into a copy -> $OUT/anofpdm.pt
#   2. volume latency, fp32 and bf16, fast and full mode
#   3. evaluation of every method (AnoFPDM DDIM / DDPM, fast / full, S_te maps; AnoDDPM; CFG-DDIM; FLAIR) on the
#      first EVAL_CASES test cases
#   4. quality against cost, each setting calibrated on its own (PNG), 5. verdicts with TF32 on and off.
# Everything is bundled into $OUT/lease.tar after each stage (the device tool returns at most 8 files; the tar is
# replaced atomically, so a lease killed mid-way still returns the last bundle):
#   figures.txt quality_vs_cost.png evaluation/{results.md,results.json,cases/,overlays/}
#
#   bash scripts/gpu_lease.sh 2>&1 | tee $OUT/log.txt        # from the repository root, wheels in .whl/ (docs/training.md)
#
# Earlier forms of this script trained the demo run: 5127 iterations in 279 s on an H200 (2026-11-28), the rest of
# the run went on on the CPU (docs/training.md, "The demo run behind the shipped model").
set -uo pipefail
END=${END:-570}            # seconds after start by which everything must be done
PY=${PY:-python3}
left() { echo $(( END - SECONDS > 1 ? END - SECONDS : 1 )); }
if compgen -G ".whl/*.whl" > /dev/null; then  # monai, nibabel, nilearn where the image lacks them
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD/lib:/tmp/site PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export WORK=${WORK:-/tmp/demo} ANOFPDM="$PY -m anofpdm.cli" CASES=${CASES:-80}
INFER_BATCH=${INFER_BATCH:-512}
EVAL_CASES=${EVAL_CASES:-16}
EVAL_METHODS=${EVAL_METHODS:-anofpdm-ddim-fast,anofpdm-ddim-full,anofpdm-ste-fast,anofpdm-ste-full,anofpdm-ddpm-fast,anofpdm-ddpm-full,anoddpm-reconstruction,cfg-ddim,flair-threshold}
RESULTS=$WORK/lease
MODEL=$WORK/anofpdm.pt
mkdir -p "$RESULTS"
publish() { tar -cf "$OUT/lease.tar.part" -C "$RESULTS" . && mv "$OUT/lease.tar.part" "$OUT/lease.tar"; }
nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 | tail -1
echo "INFER_BATCH=$INFER_BATCH EVAL_CASES=$EVAL_CASES EVAL_METHODS=$EVAL_METHODS"

echo "[$SECONDS s] data"
STAGES=data bash scripts/train_demo_model.sh || exit 1
cp model/anofpdm.pt "$MODEL"

echo "[$SECONDS s] calibrate the full modes" | tee -a "$RESULTS/figures.txt"
$ANOFPDM calibrate --model "$MODEL" --data "$WORK/slices" --split val --modes full,full-ddpm --max-slices 1000 \
    --batch-size "$INFER_BATCH" >> "$RESULTS/figures.txt" 2>&1 && cp "$MODEL" "$OUT/"
publish

echo "[$SECONDS s] volume latency" | tee -a "$RESULTS/figures.txt"
timeout "$(left)" $PY benchmarks/volume_latency.py --model "$MODEL" --data "$WORK/cases" --case SYN_00007 \
    --precisions fp32,bf16 --batch-size "$INFER_BATCH" >> "$RESULTS/figures.txt" 2>&1
publish

echo "[$SECONDS s] evaluate" | tee -a "$RESULTS/figures.txt"
timeout "$(( $(left) > 150 ? $(left) - 90 : $(left) ))" $ANOFPDM evaluate --model "$MODEL" --data "$WORK/cases" \
    --prepared "$WORK/slices" --split test --tune-split val --methods "$EVAL_METHODS" --max-cases "$EVAL_CASES" \
    --batch-size "$INFER_BATCH" --overlays 1 --out "$RESULTS/evaluation" --resume >> "$RESULTS/figures.txt" 2>&1
publish

echo "[$SECONDS s] quality against cost" | tee -a "$RESULTS/figures.txt"
timeout "$(left)" $PY benchmarks/quality_vs_cost.py --model "$MODEL" --data "$WORK/cases" --prepared "$WORK/slices" \
    --split test --cases 4 --settings 120:none,60:none,30:4,30:none,15:none,10:none --calibrate-split val \
    --batch-size "$INFER_BATCH" --out "$RESULTS/quality_vs_cost.png" >> "$RESULTS/figures.txt" 2>&1
publish

# The shipped model was calibrated on the CPU; what may differ on a GPU is arithmetic: TF32 convolutions
# (PyTorch's default) or not.
echo "[$SECONDS s] verdicts by device and batch, TF32 on and off" | tee -a "$RESULTS/figures.txt"
consistency=(benchmarks/verdict_consistency.py --model "$MODEL" --data "$WORK/slices" --slices 128
             --settings "cuda:$INFER_BATCH,cuda:32,cpu:16")
timeout "$(left)" $PY "${consistency[@]}" >> "$RESULTS/figures.txt" 2>&1
NVIDIA_TF32_OVERRIDE=0 timeout "$(left)" $PY "${consistency[@]/cpu:16/cuda:16}" >> "$RESULTS/figures.txt" 2>&1
publish
echo "[$SECONDS s] done"
