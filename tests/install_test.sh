#!/usr/bin/env bash
# tests/install_test.sh BUILD_DIR: install a built tree into a temporary
# prefix and build and run a program outside the project against it
# (tests/consumer/main.c) four ways:
#   1. CMake find_package(peer), target peer::peer (shared; CMake's rpath);
#   2. CMake find_package(peer), target peer::peer_static;
#   3. pkg-config --cflags --libs peer (shared; run with LD_LIBRARY_PATH);
#   4. pkg-config --static --libs peer_static (static: needs no libpeer.so);
# and when the tree was built with MPI (libpeer_mpi installed), the MPI
# consumer (tests/consumer/mpi_main.c) on 2 ranks two ways:
#   5. CMake find_package(peer COMPONENTS mpi), target peer::peer_mpi;
#   6. pkg-config --static --libs peer_mpi.
# Run by tools/test after the release build.
set -euo pipefail

build=$(cd "$1" && pwd)
root=$(cd "$(dirname "$0")/.." && pwd)
cc=${CC:-cc}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
prefix=$work/prefix

cmake --install "$build" --prefix "$prefix" >"$work/install.log"
pcdir=$(dirname "$(find "$prefix" -name peer.pc)")
libdir=$(dirname "$pcdir")
for f in "$prefix/include/peer.h" "$libdir/libpeer_static.a" "$libdir/cmake/peer/peerConfig.cmake" \
  "$libdir/cmake/peer/peerConfigVersion.cmake" "$pcdir/peer_static.pc" \
  "$prefix/bin/peer" "$prefix/bin/peer-ablate"; do
  [ -e "$f" ] || { echo "install_test: $f was not installed" >&2; exit 1; }
done
soname=$(objdump -p "$libdir/libpeer.so" | awk '/SONAME/ {print $2}')
[ -e "$libdir/$soname" ] || { echo "install_test: no $soname in $libdir" >&2; exit 1; }
echo "install_test: installed into $prefix (libpeer.so SONAME $soname)"

echo "install_test: 1, 2: CMake find_package(peer), peer::peer and peer::peer_static"
cmake -S "$root/tests/consumer" -B "$work/cmake" -DCMAKE_PREFIX_PATH="$prefix" \
  -DCMAKE_BUILD_TYPE=Release >"$work/cmake.log" || { cat "$work/cmake.log" >&2; exit 1; }
cmake --build "$work/cmake" >"$work/cmake-build.log" || { cat "$work/cmake-build.log" >&2; exit 1; }
"$work/cmake/consumer_shared"
"$work/cmake/consumer_static"

export PKG_CONFIG_PATH=$pcdir${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
echo "install_test: 3: $cc main.c \$(pkg-config --cflags --libs peer) -lm"
# shellcheck disable=SC2046
"$cc" "$root/tests/consumer/main.c" $(pkg-config --cflags --libs peer) -lm -o "$work/pc_shared"
LD_LIBRARY_PATH=$libdir "$work/pc_shared"

echo "install_test: 4: $cc main.c \$(pkg-config --cflags peer_static) \$(pkg-config --static --libs peer_static)"
# shellcheck disable=SC2046
"$cc" "$root/tests/consumer/main.c" $(pkg-config --cflags peer_static) \
  $(pkg-config --static --libs peer_static) -o "$work/pc_static"
if objdump -p "$work/pc_static" | grep -q 'NEEDED.*libpeer'; then
  echo "install_test: the static consumer needs libpeer.so" >&2
  exit 1
fi
"$work/pc_static"

if [ -e "$libdir/libpeer_mpi.a" ]; then
  for f in "$prefix/include/peer_mpi.h" "$libdir/cmake/peer/peerMpiTargets.cmake" \
    "$pcdir/peer_mpi.pc"; do
    [ -e "$f" ] || { echo "install_test: $f was not installed" >&2; exit 1; }
  done
  mpirun=(mpiexec -n 2)
  if mpiexec --version 2>/dev/null | grep -q "Open MPI\|OpenRTE"; then
    mpirun+=(--oversubscribe)
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  fi
  echo "install_test: 5: CMake find_package(peer COMPONENTS mpi), peer::peer_mpi (${mpirun[*]})"
  cmake -S "$root/tests/consumer" -B "$work/cmake-mpi" -DCMAKE_PREFIX_PATH="$prefix" \
    -DCMAKE_BUILD_TYPE=Release -DPEER_CONSUMER_MPI=ON >"$work/cmake-mpi.log" ||
    { cat "$work/cmake-mpi.log" >&2; exit 1; }
  cmake --build "$work/cmake-mpi" >"$work/cmake-mpi-build.log" ||
    { cat "$work/cmake-mpi-build.log" >&2; exit 1; }
  OMP_NUM_THREADS=1 "${mpirun[@]}" "$work/cmake-mpi/consumer_mpi"

  echo "install_test: 6: $cc mpi_main.c \$(pkg-config --cflags peer_mpi) \$(pkg-config --static --libs peer_mpi)"
  # shellcheck disable=SC2046
  "$cc" "$root/tests/consumer/mpi_main.c" $(pkg-config --cflags peer_mpi) \
    $(pkg-config --static --libs peer_mpi) -o "$work/pc_mpi"
  OMP_NUM_THREADS=1 "${mpirun[@]}" "$work/pc_mpi"
else
  echo "install_test: 5, 6: skipped (built without MPI: no libpeer_mpi)"
fi

for prog in peer peer-ablate; do
  "$prefix/bin/$prog" --help >/dev/null || { echo "install_test: $prog --help failed" >&2; exit 1; }
done
echo "install_test: all consumers ran"
