#!/usr/bin/env bash
# Build fusedhead and run its main job on the embedded default problem (no GPU needed):
#   bash scripts/demo.sh [N D V]
# The demo runs the CPU reference backend, so it builds in its own directory, build-demo/, without
# the CUDA backend, tests or the other programs: only the library and demo_linear_ce.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. scripts/env.sh
echo "demo: configuring build-demo/ (CPU backend only)"
mkdir -p build-demo
cmake -S . -B build-demo -DCMAKE_BUILD_TYPE=Release -DFH_ENABLE_CUDA=OFF -DFH_BUILD_TESTS=OFF -DFH_BUILD_BENCH=ON \
  -DFH_BUILD_EMULATOR=OFF >build-demo/configure.log 2>&1 || { tail -n 30 build-demo/configure.log; exit 1; }
echo "demo: building demo_linear_ce"
cmake --build build-demo -j"$(nproc)" --target demo_linear_ce
./build-demo/demo_linear_ce "$@"
