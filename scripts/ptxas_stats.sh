#!/usr/bin/env bash
# ptxas_stats.sh: compile every kernels/*.cu with nvcc for sm_80 and sm_90 (ptxas -v) and tabulate,
# per kernel and architecture, registers, stack frame, spill stores/loads and static shared memory.
# Spills are a defect (docs/architecture.md, "Kernels"): the script exits 1 if any of our kernels spills, 2 if
# a file does not compile. Kernels of CUB/Thrust (instantiated by kernels/blas.cu) are listed,
# marked "(library)", but their spills are not ours to fix and do not fail the step.
#
# usage: scripts/ptxas_stats.sh [table.md]     (run from anywhere; paths are relative to the repo)
# env:   NVCC (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc), FH_PTXAS_ARCHS (default "80 90a")
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
nvcc="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
archs="${FH_PTXAS_ARCHS:-80 90a}"
out="${1:-}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
demangle() { if command -v c++filt >/dev/null; then c++filt; else cat; fi; }

rows="$tmp/rows"
: >"$rows"
status=0
shopt -s nullglob
for arch in $archs; do
  for src in kernels/*.cu; do
    # The same flags as the library build: C++17, relaxed constexpr, optimized, our include dirs.
    if ! "$nvcc" -std=c++17 -O3 --expt-relaxed-constexpr -arch="sm_${arch}" -Xptxas -v \
        -I include -I src -I kernels -c "$src" -o "$tmp/obj.o" 2>"$tmp/log"; then
      cat "$tmp/log" >&2
      echo "ptxas_stats: $src does not compile for sm_${arch}" >&2
      status=2
      continue
    fi
    # "Compiling entry function 'K' for 'sm_XX'" opens a kernel; the "spill" line and the
    # "Used N registers ... smem" line that follow belong to it.
    awk -v file="$(basename "$src")" -v arch="sm_${arch}" '
      /Compiling entry function/ { match($0, /function .[^'"'"']*/); name = substr($0, RSTART + 10, RLENGTH - 10);
                                   stack = 0; st = 0; ld = 0; next }
      /bytes stack frame/ && name != "" { stack = $1; st = $5; ld = $9; next }
      /Used [0-9]+ registers/ && name != "" {
        match($0, /Used [0-9]+ registers/); regs = substr($0, RSTART + 5, RLENGTH - 15);
        smem = 0; if (match($0, /[0-9]+ bytes smem/)) smem = substr($0, RSTART, RLENGTH - 11);
        print file "\t" arch "\t" name "\t" regs "\t" stack "\t" st "\t" ld "\t" smem; name = "" }
    ' "$tmp/log" >>"$rows"
  done
done

{
  echo "| file | arch | kernel | registers | stack (B) | spill stores (B) | spill loads (B) | static smem (B) |"
  echo "|---|---|---|---:|---:|---:|---:|---:|"
  while IFS=$'\t' read -r file arch name regs stack st ld smem; do
    lib=""; if [[ "$name" =~ ^_ZN(3cub|6thrust) ]]; then lib=" (library)"; fi
    printf '| %s | %s | `%s`%s | %s | %s | %s | %s | %s |\n' "$file" "$arch" "$(echo "$name" | demangle)" "$lib" \
      "$regs" "$stack" "$st" "$ld" "$smem"
  done <"$rows"
} >"$tmp/table.md"
cat "$tmp/table.md"
if [ -n "$out" ]; then cp "$tmp/table.md" "$out"; fi

spills="$(awk -F'\t' '($6 > 0 || $7 > 0) && $3 !~ /^_ZN(3cub|6thrust)/' "$rows")"
if [ -n "$spills" ]; then
  echo "ptxas_stats: register spills (a defect, docs/architecture.md):" >&2
  echo "$spills" >&2
  [ "$status" -eq 0 ] && status=1
fi
if [ ! -s "$rows" ] && [ "$status" -eq 0 ]; then echo "ptxas_stats: no kernels found" >&2; fi
exit "$status"
