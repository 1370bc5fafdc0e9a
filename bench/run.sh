#!/usr/bin/env bash
# bench/run.sh: the whole benchmark suite in one command.  Installs what is
# missing and builds into build/ (as tools/run does), runs bench_forward,
# bench_pieces and bench_retrieval, and bench_cuda when the build has the CUDA
# backend (without a device it prints one line, writes no JSON and exits 0),
# with JSON output into out/bench/, and prints the markdown tables of
# bench/README.md, their floors from this host's ceilings (bench/ceilings,
# run first) and the roofline table (bench/roofline.py).  Arguments go to
# every Google Benchmark program, e.g.
#   bench/run.sh --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
set -euo pipefail
source "$(dirname "$0")/../tools/setup.sh"

peer_install_deps
peer_build build >&2
out="$PEER_ROOT/out/bench"
mkdir -p "$out"
echo "== ceilings" >&2
"$PEER_ROOT/build/bin/ceilings" --json "$out/ceilings.json" >&2
for prog in bench_forward bench_pieces bench_retrieval; do
  echo "== $prog" >&2
  "$PEER_ROOT/build/bin/$prog" --benchmark_out="$out/$prog.json" --benchmark_out_format=json "$@" >&2
done
json=("$out/bench_forward.json" "$out/bench_pieces.json" "$out/bench_retrieval.json")
if [ -x "$PEER_ROOT/build/bin/bench_cuda" ]; then
  echo "== bench_cuda" >&2
  rm -f "$out/bench_cuda.json" # no stale GPU results when this run has no device
  "$PEER_ROOT/build/bin/bench_cuda" --benchmark_out="$out/bench_cuda.json" \
    --benchmark_out_format=json "$@" >&2
  [ -s "$out/bench_cuda.json" ] && json+=("$out/bench_cuda.json")
fi
{
  python3 "$PEER_ROOT/bench/tables.py" --ceilings "$out/ceilings.json" "${json[@]}"
  python3 "$PEER_ROOT/bench/roofline.py" "$out/ceilings.json" "$out/bench_pieces.json" \
    "$out/bench_forward.json"
} | tee "$out/tables.md"
