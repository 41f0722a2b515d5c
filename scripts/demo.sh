#!/usr/bin/env bash
# Build fusedhead and run its main job on the embedded default problem (no GPU needed):
#   bash scripts/demo.sh [N D V]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. scripts/env.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DFH_BUILD_TESTS=OFF -DFH_BUILD_BENCH=ON >/dev/null
cmake --build build -j"$(nproc)" --target demo_linear_ce >/dev/null
./build/demo_linear_ce "$@"
