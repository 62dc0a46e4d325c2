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
. bench/compare.sh
methods="backprop,lra-e,reclra"
bench_compare lra-mlp "$methods" "$epochs" --model mlp --blocks 4
bench_compare lra-resnet18 "$methods" "$epochs" --model resnet18 --blocks 4 --model-opt width=16 --train-subset "$subset"
