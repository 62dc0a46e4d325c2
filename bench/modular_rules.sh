#!/usr/bin/env bash
# Modular rules against E2EBP on Fashion-MNIST, one `bpfree compare` per rule family and model, so
# every rule sees identical data, initial weights and seed: Associated Learning (K=4 components)
# and kernel modular training (K=2 modules: one hidden module holding the 4 blocks + the output
# layer; sequential, EPOCHS per module; `--blocks 4` so that its backprop reference is the very run
# of the issue-4 compare, runs/bench-local-rules-cnn-full (cnn; see bench/results/NOTES.md), or of
# the al-mlp part (mlp), reused when it exists: same config and seed, so the same numbers).
# Results are copied to bench/results/<name>/ (see bench/compare.sh).
# Re-running resumes: finished runs are kept, unfinished ones continue from their checkpoint.
# Usage: bash bench/modular_rules.sh [EPOCHS] [PARTS]   (PARTS: any of al-mlp al-cnn kernel-mlp kernel-cnn)
set -euo pipefail
cd "$(dirname "$0")/.."
epochs=${1:-5}
parts=${2:-"al-mlp al-cnn kernel-mlp kernel-cnn"}
. bench/compare.sh
run() {   # $1 = result name, $2 = methods, rest = compare options; reuses the E2EBP reference run
  name=$1
  reference=runs/bench-local-rules-cnn-full/backprop          # bpfree compare ... --model cnn --blocks 4
  [ "${name#*-}" = mlp ] && reference=runs/bench-al-mlp/backprop
  if [ -f "$reference/metrics.json" ] && [ ! -e "runs/bench-$name/backprop" ]; then
    mkdir -p "runs/bench-$name" && cp -r "$reference" "runs/bench-$name/backprop"
  fi
  bench_compare "$1" "$2" "$epochs" "${@:3}"
}
for part in $parts; do
  case $part in
    al-mlp)     run al-mlp "backprop,al" --model mlp --blocks 4 ;;
    al-cnn)     run al-cnn "backprop,al" --model cnn --blocks 4 ;;
    kernel-mlp) run kernel-mlp "backprop,kernel" --model mlp --blocks 4 ;;
    kernel-cnn) run kernel-cnn "backprop,kernel" --model cnn --blocks 4 ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
