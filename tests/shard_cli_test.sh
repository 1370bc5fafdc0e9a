#!/usr/bin/env bash
# tests/shard_cli_test.sh PEER: `peer shard --split P` then `--merge` gives
# back the weight file byte for byte (for P = 1, 2, 4, files merged in
# reverse order), and the refusals: d_model not divisible by P, too few shard
# files, a shard file given to --split.
set -euo pipefail
peer=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
"$peer" init --config d_model=64,n_heads=2,d_key=16,n_subkeys=16,top_k=4,weight_dtype=bf16 \
  --seed 5 --out w.safetensors >/dev/null
for p in 1 2 4; do
  "$peer" shard --split "$p" w.safetensors --out "s$p" >/dev/null
  files=()
  for ((r = p - 1; r >= 0; r--)); do files+=("s$p-rank$r-of-$p.safetensors"); done
  "$peer" shard --merge "${files[@]}" --out "m$p.safetensors" >/dev/null
  cmp w.safetensors "m$p.safetensors" || { echo "FAIL: split $p + merge differs"; exit 1; }
  echo "ok: split $p + merge is byte-identical"
done
expect_fail() {
  if "$@" >/dev/null 2>err.txt; then echo "FAIL: accepted: $*"; exit 1; fi
  grep -q "$want" err.txt || { echo "FAIL: '$*' said: $(cat err.txt)"; exit 1; }
  echo "ok: refused: $(cat err.txt)"
}
want="not divisible" expect_fail "$peer" shard --split 3 w.safetensors --out t
want="world size 4" expect_fail "$peer" shard --merge s4-rank0-of-4.safetensors --out x.safetensors
want="already a shard file" expect_fail "$peer" shard --split 2 s2-rank0-of-2.safetensors --out u
