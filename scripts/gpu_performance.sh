#!/usr/bin/env bash
# The GPU figures of docs/performance.md (#40 item 3) in one short lease: the shipped model on the four demo studies
# (demo/studies: a large tumour, a small one, a healthy brain, a whole head), fast and full mode, all of a volume's
# slices in one network batch, fp32 and bf16 autocast. Per run: wall time of the whole segment_volume and of each
# stage (network part included), peak GPU memory, and whether bf16 changes the label map (voxels differing, 3-D Dice
# against the first fp32 run, on every case; the fp32 repeat gives the run-to-run floor); then `anofpdm segment` on
# SYN_00000 in both modes, process start included. No synthetic cases are generated: the demo studies are committed,
# so they travel with the repository. About 5 minutes on an H200, estimated from the older network's figures there
# (docs/performance.md); END caps the measurements.
#
#   bash scripts/gpu_performance.sh           # from the repository root, on the lent GPU
#
# Written to $OUT (./runs/gpu_performance when unset), each file replaced atomically as soon as a run ends, so a
# run stopped at its limit still returns every figure that finished:
#   volume_latency.json, volume_latency.md   the figures (benchmarks/volume_latency.py --out)
#   card.txt                                 nvidia-smi's name, memory and driver of the card
#   log.txt                                  everything printed
# The GPU image lacks monai, nibabel, SimpleITK and deepbet (the head's brain extraction). Bring them in .whl/
# (git-ignored by .git/info/exclude), as wheels, except SimpleITK: its wheel alone is 52.8 MB, which with the
# 18 MB of tracked files passes the 64 MiB that travels, so it goes as an xz tarball of its contents (28.7 MB; about
# 62 MB travel in all; xz took 5 minutes on the 2-core CPU):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl monai==1.6.1 nibabel==5.4.2 deepbet==1.0.2 simpleitk==2.5.7
#   mkdir /tmp/sitk && unzip -q .whl/simpleitk-*.whl -d /tmp/sitk && rm .whl/simpleitk-*.whl
#   tar -C /tmp/sitk -cJf .whl/simpleitk.tar.xz .
# and name .whl in the device tool's carry.
#
# On a CPU, with small settings (9 minutes on the 2-core CPU, docs/performance.md; tests/test_gpu_performance_script.py
# runs it on four planes of a demo study):
#   DEVICE=cpu CASES=SYN_00001 CLI_CASE=SYN_00001 FULL_STEPS=2 PRECISIONS=fp32,bf16 END=1500 \
#       bash scripts/gpu_performance.sh
set -uo pipefail
END=${END:-480}                        # seconds after start by which the measurements must be done
PY=${PY:-python3}
OUT=${OUT:-runs/gpu_performance}
MODEL=${MODEL:-model/anofpdm.pt}
STUDIES=${STUDIES:-demo/studies}
CASES=${CASES:-all}                    # comma list of study ids, or all
CLI_CASE=${CLI_CASE:-SYN_00000}        # timed through `anofpdm segment` too
PRECISIONS=${PRECISIONS:-fp32,bf16,fp32}
BATCH=${BATCH:-volume}                 # slices per network batch; volume: all of a volume's slices in one
FULL_STEPS=${FULL_STEPS:-}             # set: the full mode runs to this many steps, its network time extrapolated
DEVICE=${DEVICE:-}                     # empty: cuda when there is one
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
tee_pid=$!
source scripts/lease_packages.sh  # monai, nibabel, SimpleITK, deepbet where the image lacks them
export PYTHONPATH=$PWD/lib${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_DISABLE=1

if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/card.txt.part" 2>&1
    mv "$OUT/card.txt.part" "$OUT/card.txt"
    cat "$OUT/card.txt"
fi
echo "[$SECONDS s] volume latency: studies $STUDIES, cases $CASES, precisions $PRECISIONS, batch $BATCH"
timeout -k 10 $(( END - SECONDS > 1 ? END - SECONDS : 1 )) $PY benchmarks/volume_latency.py --model "$MODEL" \
    --studies "$STUDIES" --cases "$CASES" --precisions "$PRECISIONS" --batch-size "$BATCH" --cli-case "$CLI_CASE" \
    --out "$OUT" ${FULL_STEPS:+--full-steps "$FULL_STEPS"} ${DEVICE:+--device "$DEVICE"}
status=$?
echo "[$SECONDS s] done (exit $status); figures in $OUT/volume_latency.md"
[[ -f $OUT/volume_latency.md ]] && cat "$OUT/volume_latency.md"
exec >&- 2>&-
wait "$tee_pid"  # log.txt complete before the script returns
exit $status
