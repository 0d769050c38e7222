#!/usr/bin/env bash
# Copy a finished comparison's records into the repository, without weights:
#   bash results/collect.sh runs/compare-cifar10 results/compare-cifar10-cpu configs/compare-cifar10-cpu.toml
# Copies comparison.json, tables.md, the plots and their data, the compare config, and each run's
# config.toml, metrics.jsonl, training.json, results.json and log.txt.
set -euo pipefail
if [ $# -ne 3 ]; then
    echo "usage: bash results/collect.sh COMPARE_OUT_DIR DEST_DIR COMPARE_CONFIG" >&2
    exit 2
fi
src=$1 dest=$2 config=$3
[ -f "$src/comparison.json" ] || { echo "collect: $src holds no comparison.json; run repulsor compare first" >&2; exit 2; }
mkdir -p "$dest"
cp "$src/comparison.json" "$src/tables.md" "$dest/"
for f in robustness_curves.png robustness_curves.json epochs.png epochs.csv; do
    [ -f "$src/$f" ] && cp "$src/$f" "$dest/"
done
cp "$config" "$dest/config.toml"
for run in "$src"/*/; do
    name=$(basename "$run")
    [ -f "$run/training.json" ] || continue
    mkdir -p "$dest/runs/$name"
    for f in config.toml metrics.jsonl training.json results.json log.txt; do
        [ -f "$run/$f" ] && cp "$run/$f" "$dest/runs/$name/"
    done
done
echo "collected $src into $dest"
