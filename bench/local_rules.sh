#!/usr/bin/env bash
# Block-local rules against E2EBP on Fashion-MNIST (bwbpf, dgl, predsim), one `bpfree compare` per
# model so every rule sees identical data, initial weights and seed. Results (summary.json,
# summary.md, plots; the command is recorded inside) are copied to bench/results/local-rules-*/.
# Re-running resumes: finished runs are kept, unfinished ones continue from their checkpoint.
# Usage: bash bench/local_rules.sh [EPOCHS] [CNN_WIDTHS] [METHODS]
set -euo pipefail
cd "$(dirname "$0")/.."
epochs=${1:-5}
widths=${2:-32,64,128,128}
methods=${3:-"backprop,bwbpf,bwbpf[variant=deep-supervision],dgl,dgl[schedule=sequential],predsim"}
run() {   # $1 = result name, rest = compare options
  name=$1; shift
  bpfree compare --methods "$methods" --data fashion-mnist --epochs "$epochs" --threads 2 --quiet \
    --out "runs/bench-$name" --resume "$@"
  mkdir -p "bench/results/$name"
  cp runs/bench-$name/summary.* runs/bench-$name/*.png "bench/results/$name/"
}
run local-rules-mlp --model mlp --blocks 4
run local-rules-cnn --model cnn --blocks 4 --model-opt "widths=$widths"
