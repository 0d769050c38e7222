#!/usr/bin/env bash
# Reproduces the evaluation finding in the README (issue 3): prototype and cross-entropy models
# on MNIST (small CNN) and CIFAR-10 (CPU preset), attacked by every suite.
# Run from the repository root; the data folders are those of the development machines.
set -euo pipefail
MNIST=../shared/data/mnist
train() { [ -f "$2/model.safetensors" ] || repulsor train "$@" --quiet; }
train --config configs/mnist-prototype.toml --data-dir $MNIST --out runs/mnist-prototype
train --config configs/mnist-ce.toml --data-dir $MNIST --out runs/mnist-ce
for run in runs/mnist-prototype runs/mnist-ce; do
  for suite in quick paper standard adaptive; do
    repulsor evaluate $run --suite $suite --n 500 --quiet
  done
  for suite in quick standard adaptive; do
    repulsor evaluate $run --suite $suite --n 500 --eps 0.1 --quiet
  done
done
repulsor evaluate runs/mnist-prototype --suite quick --n 10000 --quiet   # the whole test set
train --config configs/cifar10-cpu.toml --out runs/cifar10-prototype
train --config configs/cifar10-cpu.toml --set train.method=ce --set train.lr=0.1 --out runs/cifar10-ce
for run in runs/cifar10-prototype runs/cifar10-ce; do
  for suite in quick paper; do
    repulsor evaluate $run --suite $suite --n 1000 --quiet
  done
  for suite in standard adaptive; do
    repulsor evaluate $run --suite $suite --n 200 --quiet
  done
done
# Keep each run's record beside the README's table.
for run in mnist-prototype mnist-ce cifar10-prototype cifar10-ce; do
  mkdir -p results/finding/$run
  cp runs/$run/{results.json,config.toml,training.json,metrics.jsonl,log.txt} results/finding/$run/
done
python results/finding/table.py results/finding/mnist-prototype results/finding/mnist-ce \
    results/finding/cifar10-prototype results/finding/cifar10-ce
