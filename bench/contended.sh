#!/usr/bin/env bash
# bench/contended.sh: the forward and the training step when another process
# holds a core (issue 15 item 7; DESIGN.md "Performance method": the machine
# is shared).  Runs bench_forward's reference config (f32 tables), batch 512
# and 1, 1 and 2 threads, first alone and then with a busy loop pinned to
# core 0 (taskset), alternating, for several rounds; prints the median over
# rounds of each case's median time, and the 2-thread over 1-thread time.
#
#   bench/contended.sh [--rounds R] [--reps N] [--filter REGEX] [--out DIR] [VARIANT ...]
#
# A VARIANT is LABEL:BINARY[:VAR=VALUE...] (a bench_forward binary and the
# environment to run it in); variants alternate within each round, so old and
# new code (or two OpenMP settings) are compared on the same machine state.
# Default: one variant, build/bin/bench_forward.  Example:
#   bench/contended.sh --rounds 3 base:build/bin/bench_forward \
#       passive:build/bin/bench_forward:OMP_WAIT_POLICY=passive
# The JSON of every run is kept in --out (default out/contended/).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
rounds=3
reps=3
filter='(forward|train_step)/ref/f32/batch:(512|1)/threads:(1|2)/'
out="$root/out/contended"
variants=()
while [ $# -gt 0 ]; do
  case "$1" in
  --rounds) rounds="$2"; shift 2 ;;
  --reps) reps="$2"; shift 2 ;;
  --filter) filter="$2"; shift 2 ;;
  --out) out="$2"; shift 2 ;;
  -h | --help) sed -n '2,18p' "$0"; exit 0 ;;
  -*) echo "contended.sh: unknown option $1" >&2; exit 2 ;;
  *) variants+=("$1"); shift ;;
  esac
done
[ ${#variants[@]} -gt 0 ] || variants=("base:$root/build/bin/bench_forward")
command -v taskset >/dev/null || { echo "contended.sh: needs taskset (util-linux)" >&2; exit 2; }
mkdir -p "$out"

busy_pid=""
stop_busy() {
  if [ -n "$busy_pid" ]; then
    kill "$busy_pid" 2>/dev/null || true
    wait "$busy_pid" 2>/dev/null || true
    busy_pid=""
  fi
}
trap stop_busy EXIT

run_one() { # label binary env... -> JSON file
  local label="$1" bin="$2" json="$3"
  shift 3
  env "$@" "$bin" --benchmark_filter="$filter" --benchmark_repetitions="$reps" \
    --benchmark_report_aggregates_only=true --benchmark_out="$json" \
    --benchmark_out_format=json >/dev/null 2>"$json.err" ||
    { echo "contended.sh: $label failed, see $json.err" >&2; exit 1; }
}

echo "# $(date -u '+%F %T') UTC, load average: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
files=()
for ((r = 1; r <= rounds; r++)); do
  for v in "${variants[@]}"; do
    IFS=: read -r -a parts <<<"$v"
    label="${parts[0]}" bin="${parts[1]}"
    envs=("${parts[@]:2}")
    [ -x "$bin" ] || { echo "contended.sh: no executable $bin" >&2; exit 2; }
    for cond in alone busy; do
      if [ "$cond" = busy ]; then
        taskset -c 0 bash -c 'while :; do :; done' &
        busy_pid=$!
      fi
      json="$out/$label.$cond.$r.json"
      echo "# round $r, $label, $cond (load $(cut -d' ' -f1 /proc/loadavg))" >&2
      run_one "$label" "$bin" "$json" "${envs[@]}"
      stop_busy
      files+=("$json")
    done
  done
done
echo "# $(date -u '+%F %T') UTC, load average: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

python3 - "$root/bench" "${files[@]}" <<'EOF'
import os, statistics, sys
sys.path.insert(0, sys.argv[1])
from tables import call_ms, load, parse_name

cases = {}  # (label, cond, step, batch, threads) -> [ms per round]
for path in sys.argv[2:]:
    label, cond, _ = os.path.basename(path).rsplit(".", 3)[:3]
    for name, r in load([path]).items():
        kind, words, f = parse_name(name)
        if "error" in r or kind not in ("forward", "train_step"):
            continue
        key = (label, cond, kind, int(f["batch"]), int(f["threads"]))
        cases.setdefault(key, []).append(call_ms(r))

print("| variant | step | batch | competing busy core | 1 thread ms | 2 threads ms | 2 threads / 1 thread |")
print("|---|---|---:|---|---:|---:|---:|")
seen = sorted({k[:1] + k[2:4] for k in cases}, key=lambda k: (k[0], k[1], -k[2]))
for label, kind, batch in seen:
    for cond in ("alone", "busy"):
        t = [cases.get((label, cond, kind, batch, n)) for n in (1, 2)]
        if not all(t):
            continue
        m1, m2 = statistics.median(t[0]), statistics.median(t[1])
        spread = lambda v: f"{statistics.median(v):.3g} ({min(v):.3g}-{max(v):.3g})"
        step = "forward" if kind == "forward" else "training step"
        print(f"| {label} | {step} | {batch} | {'yes' if cond == 'busy' else 'no'} | {spread(t[0])}"
              f" | {spread(t[1])} | {m2 / m1:.2f} |")
EOF
