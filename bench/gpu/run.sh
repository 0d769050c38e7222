#!/usr/bin/env bash
# The fast CIFAR-10 comparison on a lent GPU machine, in one call of the device tool (about 6 minutes).
#
# Here, before the call (the data travel packed, bit for bit; see pack_jpeg.py):
#   python bench/gpu/pack_jpeg.py pack ../shared/data/cifar10_jpeg carry/cifar10_jpeg.npz train
#   python bench/gpu/pack_jpeg.py pack ../shared/data/cifar10_jpeg carry/cifar10_jpeg_test.npz test
#   cp -r ../shared/data/cifar10_test1000_lossless carry/test1000
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl tomli-w==1.2.0
# The call (device tool): command "bash bench/gpu/run.sh", carry ["carry", ".whl"].
#
# It runs, each under its own deadline so that whatever finished comes back:
#   1. configs/compare-cifar10-fast.toml: ce, prototype and Table 1's D = 50 and 200;
#   2. the fast recipe at 20 epochs for ce and prototype (train, quick suite);
#   3. the rest of the comparison (hpn, mmc, pcl, fgsm_rs) until the deadline.
# and writes to $OUT: log.txt, the run folders without weights and checkpoints (records.tar.gz),
# and the weights of the fast ce, prototype (D = 50, 100, 200) and 20-epoch models (weights-*.tar).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}
DEVICE=${DEVICE:-cuda}
START=$(date +%s)
left() { echo $(( START + $1 * SCALE / 100 - $(date +%s) )); }
SCALE=${SCALE:-100}          # percent of the deadlines below (a dry run here uses a few)
log() { echo "[$(date +%T) +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/log.txt"; }
mkdir -p "$OUT"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD/src:/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/log.txt"
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/log.txt"

mkdir -p /tmp/data/cifar10
for part in cifar10_jpeg cifar10_jpeg_test; do
    python3 bench/gpu/pack_jpeg.py unpack "carry/$part.npz" /tmp/data/cifar10 2>&1 | tee -a "$OUT/log.txt" \
        || python3 bench/gpu/pack_jpeg.py unpack "carry/$part.npz" /tmp/data/cifar10 --allow-mismatch 2>&1 | tee -a "$OUT/log.txt"
done
cp carry/classes.txt /tmp/data/cifar10/ 2>/dev/null

fast() {  # fast() DEADLINE [--only ...]
    local until=$1; shift
    local t; t=$(left "$until"); [ "$t" -gt 20 ] || { log "skip fast $*: no time"; return; }
    log "fast compare $* (deadline ${t}s)"
    timeout --signal=TERM --kill-after=15 "$t" python3 -m repulsor compare configs/compare-cifar10-fast.toml \
        --out runs/gpu-fast --data-dir /tmp/data/cifar10 --set data.test_dir="$PWD/carry/test1000" \
        --device "$DEVICE" --quiet "$@" >>"$OUT/log.txt" 2>&1
    log "fast compare $* ended with rc $?"
}
fast 190 --only ce prototype prototype-D50 prototype-D200
for method in ${E20-ce prototype}; do  # the recipe at twice the epochs, towards the 92% / 90% targets
    t=$(left 265); [ "$t" -gt 20 ] || break
    log "train $method, 20 epochs (deadline ${t}s)"
    extra=(); [ "$method" = ce ] && extra=(--set train.label_smoothing=0.2 --set "train.val_losses=[]")
    timeout --signal=TERM --kill-after=15 "$t" python3 -m repulsor train --config configs/cifar10-fast.toml \
        --set train.method=$method "${extra[@]}" --set train.epochs=20 --data-dir /tmp/data/cifar10 \
        --set data.test_dir="$PWD/carry/test1000" --device "$DEVICE" --quiet --out "runs/gpu-e20/$method" >>"$OUT/log.txt" 2>&1
    log "train $method ended with rc $?"
done
fast 345

log "packaging"
dirs=(); for d in runs/gpu-fast runs/gpu-e20; do [ -d "$d" ] && dirs+=("$d"); done
tar czf "$OUT/records.tar.gz" --exclude='checkpoints' --exclude='model.safetensors' --exclude='figures' "${dirs[@]}" \
    2>>"$OUT/log.txt"
for run in ce prototype prototype-D50 prototype-D200; do
    [ -f "runs/gpu-fast/$run/model.safetensors" ] && tar cf "$OUT/weights-$run.tar" "runs/gpu-fast/$run/model.safetensors"
done
for run in ce prototype; do
    [ -f "runs/gpu-e20/$run/model.safetensors" ] && tar cf "$OUT/weights-e20-$run.tar" "runs/gpu-e20/$run/model.safetensors"
done
ls -la "$OUT" | tee -a "$OUT/log.txt"
log "done"
