#!/usr/bin/env bash
# tests/symbols_test.sh LIB CC HEADER... [-- CFLAGS...]: the shared library
# exports exactly the functions its public headers mark PEER_API.
#
# The allowed names come from the headers themselves: they are preprocessed
# with PEER_API defined as a marker, and every function declared after the
# marker is public.  The test fails on
#   - a defined dynamic symbol of LIB that is not one of them (an internal
#     that leaks: the library is built with hidden visibility);
#   - a public function LIB does not export (a declaration without a
#     definition, or one that lost PEER_API);
#   - a peer_* function a header declares without PEER_API.
# Run by ctest (CMakeLists.txt) with the library's own compiler.
set -euo pipefail

lib=$1 cc=$2
shift 2
headers=() cflags=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do headers+=("$(realpath "$1")"); shift; done
[ $# -gt 0 ] && shift
cflags=("$@")

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

for h in "${headers[@]}"; do echo "#include \"$h\""; done >"$tmp/all.c"
# One statement per line: join the text, then split at ; { and }.
"$cc" -E -P -DPEER_API=__peer_api_marker__ "${cflags[@]}" "$tmp/all.c" |
  tr '\n' ' ' | tr ';{}' '\n\n\n' >"$tmp/statements"

# Public: the name before the first ( of each marked statement.
grep '__peer_api_marker__' "$tmp/statements" |
  sed -E 's/^.*__peer_api_marker__//; s/\(.*//; s/.*[^A-Za-z0-9_]([A-Za-z_][A-Za-z0-9_]*) *$/\1/' |
  sort -u >"$tmp/public"
# Declared: every peer_* name directly followed by ( outside typedefs.
grep -v '^ *typedef' "$tmp/statements" | grep -oE '\bpeer_[A-Za-z0-9_]+ *\(' |
  sed -E 's/ *\($//' | sort -u >"$tmp/declared"
nm -D --defined-only "$lib" | awk '{print $NF}' | sed 's/@.*//' | sort -u >"$tmp/exported"

fail=0
n_public=$(wc -l <"$tmp/public")
if [ "$n_public" -lt 10 ]; then
  echo "symbols_test: only $n_public PEER_API functions found in ${headers[*]}: the parse failed" >&2
  exit 1
fi
while read -r name; do
  echo "symbols_test: $name is declared in ${headers[*]} without PEER_API" >&2
  fail=1
done < <(comm -23 "$tmp/declared" "$tmp/public")
while read -r name; do
  echo "symbols_test: $lib exports $name, which no public header marks PEER_API" >&2
  fail=1
done < <(comm -13 "$tmp/public" "$tmp/exported")
while read -r name; do
  echo "symbols_test: $lib does not export $name (PEER_API in ${headers[*]})" >&2
  fail=1
done < <(comm -23 "$tmp/public" "$tmp/exported")
[ "$fail" = 0 ] && echo "symbols_test: $lib exports exactly the $n_public PEER_API functions of ${headers[*]}"
exit "$fail"
