#!/usr/bin/env bash
# rec-LRA and LRA-E against E2EBP on Fashion-MNIST: the mlp on the full training set, and resnet18
# (width 16, a quarter of the channels) on a held-out-free subset of TRAIN_SUBSET examples (a full
# resnet18 epoch takes tens of minutes on 2 CPU cores). One `bpfree compare` each: identical data,
# initial weights and seed. Results go to bench/results/lra-*/ (summary.md names the command).
# Usage: bash bench/lra.sh [EPOCHS] [TRAIN_SUBSET]
set -euo pipefail
cd "$(dirname "$0")/.."
epochs=${1:-5}
subset=${2:-10000}
run() {   # $1 = result name, rest = compare options
  name=$1; shift
  bpfree compare --methods "backprop,lra-e,reclra" --data fashion-mnist --epochs "$epochs" --threads 2 --quiet \
    --out "runs/bench-$name" --resume "$@"
  mkdir -p "bench/results/$name"
  cp runs/bench-$name/summary.* runs/bench-$name/*.png "bench/results/$name/"
}
run lra-mlp --model mlp --blocks 4
run lra-resnet18 --model resnet18 --blocks 4 --model-opt width=16 --train-subset "$subset"
