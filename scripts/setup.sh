#!/usr/bin/env bash
# Install what building and testing fusedhead needs on a Debian machine, when it is missing.
# CUDA is optional: with nvcc on PATH (or in /usr/local/cuda/bin) the CUDA backend is built too;
# with CUDA's headers present the SIMT emulator and the kernel suites are built.
set -euo pipefail
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v make >/dev/null || need+=(make)
command -v gcc >/dev/null || need+=(gcc)
command -v g++ >/dev/null || need+=(g++)
command -v pkg-config >/dev/null || need+=(pkg-config)
pkg-config --exists criterion 2>/dev/null || need+=(libcriterion-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
