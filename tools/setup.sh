# tools/setup.sh: sourced by tools/run and tools/test.  Installs what the build
# needs (Debian/Ubuntu packages) when it is missing, then configures and builds
# into $1 with the CMake options that follow.
set -euo pipefail

PEER_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEER_JOBS=${PEER_JOBS:-$(nproc)}

peer_missing_packages() {
  local missing=()
  command -v cmake >/dev/null || missing+=(cmake)
  command -v cc >/dev/null || missing+=(gcc g++)
  command -v pkg-config >/dev/null || missing+=(pkg-config)
  pkg-config --exists criterion 2>/dev/null || missing+=(libcriterion-dev)
  pkg-config --exists jansson 2>/dev/null || missing+=(libjansson-dev)
  [ -e /usr/lib/x86_64-linux-gnu/cmake/benchmark/benchmarkConfig.cmake ] ||
    [ -n "$(find /usr /usr/local -name benchmarkConfig.cmake 2>/dev/null | head -n 1)" ] ||
    missing+=(libbenchmark-dev)
  command -v gnuplot >/dev/null || missing+=(gnuplot-nox)
  # Open MPI: libpeer_mpi and the sharded-layer tests (README "Sharding")
  { command -v mpirun >/dev/null && command -v mpicc >/dev/null; } ||
    missing+=(openmpi-bin libopenmpi-dev)
  echo "${missing[@]:-}"
}

peer_install_deps() {
  local missing
  missing=$(peer_missing_packages)
  [ -z "$missing" ] && return 0
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing $missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
  else
    echo "setup: missing packages; run: sudo apt-get install -y $missing" >&2
    exit 1
  fi
}

peer_build() {
  local dir=$1
  shift
  cmake -S "$PEER_ROOT" -B "$PEER_ROOT/$dir" -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
  cmake --build "$PEER_ROOT/$dir" -j "$PEER_JOBS"
}
