#!/usr/bin/env bash
# Recipe variants of configs/cifar10-fast.toml on a lent GPU (device tool: command
# "bash bench/gpu/recipe.sh", carry ["carry", ".whl"]; see run.sh for the data), each trained
# with `repulsor train` and scored by the quick suite on the 1000 exact test images, under one deadline.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}
DEVICE=${DEVICE:-cuda}
DEADLINE=${DEADLINE:-190}
START=$(date +%s)
mkdir -p "$OUT"
log() { echo "[$(date +%T) +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/log.txt"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD/src:/tmp/site
mkdir -p /tmp/data/cifar10
[ -f /tmp/data/cifar10/train.npz ] || python3 bench/gpu/pack_jpeg.py unpack carry/cifar10_jpeg.npz /tmp/data/cifar10 | tee -a "$OUT/log.txt"
variants=(
    "ce-plain-e10|train.method=ce train.label_smoothing=0.2 train.val_losses=[] model.centre_features=false"
    "ce-plain-e20|train.method=ce train.label_smoothing=0.2 train.val_losses=[] model.centre_features=false train.epochs=20"
    "prototype-plain-e20|train.method=prototype model.centre_features=false train.epochs=20"
    "ce-w1.4-e10|train.method=ce train.label_smoothing=0.2 train.val_losses=[] model.width=1.4"
    "prototype-w1.4-e10|train.method=prototype model.width=1.4"
)
for v in "${variants[@]}"; do
    name=${v%%|*}; sets=(); for kv in ${v#*|}; do sets+=(--set "$kv"); done
    t=$(( START + DEADLINE - $(date +%s) )); [ "$t" -gt 15 ] || { log "skip $name: no time"; continue; }
    log "train $name: ${v#*|}"
    timeout --signal=TERM --kill-after=10 "$t" python3 -m repulsor train --config configs/cifar10-fast.toml "${sets[@]}" \
        --data-dir /tmp/data/cifar10 --set data.test_dir="$PWD/carry/test1000" --device "$DEVICE" --quiet \
        --out "runs/gpu-recipe/$name" 2>&1 | grep -E "clean accuracy|worst case|finished" | tee -a "$OUT/log.txt"
done
tar czf "$OUT/recipe.tar.gz" --exclude='checkpoints' --exclude='model.safetensors' runs/gpu-recipe
log "done"
