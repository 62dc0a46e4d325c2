# Sourced by the bench scripts: one resumable `bpfree compare` on Fashion-MNIST whose results
# (summary.json/.md with the command inside, plots) are copied to bench/results/NAME/.
# Usage: bench_compare NAME METHODS EPOCHS [compare options...]
bench_compare() {
  local name=$1 methods=$2 epochs=$3
  shift 3
  bpfree compare --methods "$methods" --data fashion-mnist --epochs "$epochs" --threads 2 --quiet \
    --out "runs/bench-$name" --resume "$@"
  mkdir -p "bench/results/$name"
  cp runs/bench-$name/summary.* runs/bench-$name/*.png "bench/results/$name/"
}
