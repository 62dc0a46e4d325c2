#!/usr/bin/env bash
# Modular rules against E2EBP on Fashion-MNIST, one `bpfree compare` per rule family and model, so
# every rule sees identical data, initial weights and seed: Associated Learning (K=4 components)
# and kernel modular training (K=2 modules: one hidden module holding the 4 blocks + the output
# layer; sequential, EPOCHS per module; `--blocks 4` so that its backprop reference is the very run
# of bench/local_rules.sh (cnn) or of the al-mlp part (mlp), which the script reuses when it exists:
# same config and seed, so the same numbers).
# Results (summary.json/.md with the command inside, plots) are copied to bench/results/<name>/.
# Re-running resumes: finished runs are kept, unfinished ones continue from their checkpoint.
# Usage: bash bench/modular_rules.sh [EPOCHS] [PARTS]   (PARTS: any of al-mlp al-cnn kernel-mlp kernel-cnn)
set -euo pipefail
cd "$(dirname "$0")/.."
epochs=${1:-5}
parts=${2:-"al-mlp al-cnn kernel-mlp kernel-cnn"}
run() {   # $1 = result name, $2 = methods, rest = compare options
  name=$1; methods=$2; shift 2
  reference=runs/bench-local-rules-cnn-full/backprop          # bpfree compare ... --model cnn --blocks 4
  [ "${name#*-}" = mlp ] && reference=runs/bench-al-mlp/backprop
  if [ -f "$reference/metrics.json" ] && [ ! -e "runs/bench-$name/backprop" ]; then
    mkdir -p "runs/bench-$name" && cp -r "$reference" "runs/bench-$name/backprop"
  fi
  bpfree compare --methods "$methods" --data fashion-mnist --epochs "$epochs" --threads 2 --quiet \
    --out "runs/bench-$name" --resume "$@"
  mkdir -p "bench/results/$name"
  cp runs/bench-$name/summary.* runs/bench-$name/*.png "bench/results/$name/"
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
