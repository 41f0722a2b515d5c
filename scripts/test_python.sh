#!/usr/bin/env bash
# Run the PyTorch integration tests (python/tests) against a built libfusedhead.so:
#   bash scripts/test_python.sh BUILD_DIR        (BUILD_DIR contains libfusedhead.so)
# Builds nothing. Uses Debian's /usr/bin/python3 and python3-torch (installed with apt-get when
# missing; no pip). Prints a closing line "python: N passed, N failed"; exits nonzero on failure.
set -uo pipefail
cd "$(dirname "$0")/.."
build=${1:?usage: scripts/test_python.sh BUILD_DIR (containing libfusedhead.so)}
lib="$(cd "$build" 2>/dev/null && pwd)/libfusedhead.so"
if [ ! -f "$lib" ]; then
  echo "test_python: $lib not found (build the fusedhead target first)"
  echo "python: 0 passed, 1 failed"
  exit 1
fi
py=/usr/bin/python3
if ! "$py" -c 'import torch' >/dev/null 2>&1; then
  echo "test_python: installing python3-torch"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  if ! { $SUDO apt-get update -qq &&
         DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-torch >/dev/null; }; then
    echo "test_python: could not install python3-torch"
    echo "python: 0 passed, 1 failed"
    exit 1
  fi
fi
# No __pycache__ left in the source tree by a test run.
PYTHONDONTWRITEBYTECODE=1 FUSEDHEAD_LIBRARY="$lib" "$py" python/tests/run_tests.py
