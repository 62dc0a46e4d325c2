#!/usr/bin/env bash
# Block-local rules against E2EBP on Fashion-MNIST (bwbpf, dgl, predsim), one `bpfree compare` per
# model so every rule sees identical data, initial weights and seed. Results are copied to
# bench/results/local-rules-*/ (see bench/compare.sh).
# Re-running resumes: finished runs are kept, unfinished ones continue from their checkpoint.
# Usage: bash bench/local_rules.sh [EPOCHS] [CNN_WIDTHS] [METHODS]
set -euo pipefail
cd "$(dirname "$0")/.."
epochs=${1:-5}
widths=${2:-32,64,128,128}
methods=${3:-"backprop,bwbpf,bwbpf[variant=deep-supervision],dgl,dgl[schedule=sequential],predsim"}
. bench/compare.sh
bench_compare local-rules-mlp "$methods" "$epochs" --model mlp --blocks 4
bench_compare local-rules-cnn "$methods" "$epochs" --model cnn --blocks 4 --model-opt "widths=$widths"
