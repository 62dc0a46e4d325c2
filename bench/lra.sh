#!/usr/bin/env bash
# rec-LRA and LRA-E against E2EBP on Fashion-MNIST, with feedback-alignment-style baselines built
# from the same rule: "FA" = lra-e with fixed random feedback (targets from the layer above through
# a fixed E), "DFA" = reclra with every hidden node skip-linked to the output error through fixed
# random matrices. The mlp (256x4) on the full training set; resnet18 at width 16 (a quarter of the
# channels) on a seeded subset of TRAIN_SUBSET examples (a full-width resnet18 epoch takes tens of
# minutes on 2 CPU cores). One `bpfree compare` each: identical data, initial weights and seed;
# results go to bench/results/lra-*/ (summary.md names the command). Time per epoch is best read from
# bench/epoch_time.py (interleaved rounds), as compare's times depend on what else the machine ran.
# Usage: bash bench/lra.sh [EPOCHS] [TRAIN_SUBSET]
set -euo pipefail
cd "$(dirname "$0")/.."
epochs=${1:-5}
subset=${2:-20000}
. bench/compare.sh
methods="backprop,lra-e,reclra,lra-e[feedback_update=fixed,feedback_init=random],reclra[skip_every=1,feedback_update=fixed,feedback_init=random]"
bench_compare lra-mlp "$methods" "$epochs" --model mlp --blocks 4
bench_compare lra-resnet18 "$methods" "$epochs" --model resnet18 --blocks 4 --model-opt width=16 --train-subset "$subset"
