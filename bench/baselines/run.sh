#!/usr/bin/env bash
# bench/baselines/run.sh: peer against lucidrains' PEER-pytorch (pinned in
# requirements.txt).  Makes its own virtual environment in bench/baselines/.venv
# on first use (torch is large: several GB), builds peer into build/ unless
# --lib/--cli point elsewhere, then runs pytorch_baseline.py with the
# arguments given (see --help): equivalence check, then timings.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$here/.venv"
if ! "$venv/bin/python" -c 'import PEER_pytorch, torch, numpy, safetensors' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet -r "$here/requirements.txt"
fi
case " $* " in
  *" --lib "* | *" --lib="*) ;;
  *)
    cmake -S "$root" -B "$root/build" >/dev/null
    cmake --build "$root/build" -j2 --target peer peer_cli >/dev/null
    ;;
esac
exec "$venv/bin/python" "$here/pytorch_baseline.py" "$@"
