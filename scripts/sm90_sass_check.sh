#!/usr/bin/env bash
# sm90_sass_check.sh: evidence that kernels/engine/ptx_sm90.cuh's wrappers assemble for sm_90a and
# select Hopper's instructions. Compiles tests/sm90/probe_sm90.cu with nvcc
# (-gencode=arch=compute_90a,code=sm_90a: wgmma and setmaxnreg need the a target), disassembles it
# with cuobjdump -sass and checks that the SASS has HGMMA (wgmma.mma_async), UTMALDG (the bulk
# tensor copy) and SYNCS (mbarrier) instructions, and no local-memory spills (STL/LDL). No GPU is
# needed. cuobjdump is found as scripts/sass_table.sh finds it ($CUOBJDUMP, PATH, the toolkit, or
# a private pip install into build-tools/cuda-binutils).
#
# usage: scripts/sm90_sass_check.sh [OUT_DIR]     default build-tools/sm90_probe
# exit:  0 all found; 1 an instruction is missing or spills; 2 nvcc failed;
#        3 nvcc or cuobjdump missing and not installable (a skip for callers).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
out="${1:-$root/build-tools/sm90_probe}"
mkdir -p "$out"
nvcc="$(command -v nvcc || true)"
[ -n "$nvcc" ] || { [ -x /usr/local/cuda/bin/nvcc ] && nvcc=/usr/local/cuda/bin/nvcc; }
if [ -z "$nvcc" ]; then echo "sm90_sass_check: no nvcc: skipped (exit 3)" >&2; exit 3; fi

# ---- cuobjdump + nvdisasm, as scripts/sass_table.sh finds them ----
. "$here/find_cuobjdump.sh"
fh_find_cuobjdump sm90_sass_check "$root" "$(command -v python3 || true)" || exit 3

# ---- compile and disassemble ----
cubin="$out/probe_sm90.cubin"
if ! "$nvcc" -std=c++17 -gencode=arch=compute_90a,code=sm_90a -cubin -O3 -Xptxas -v -I"$root/kernels" \
     -o "$cubin" "$root/tests/sm90/probe_sm90.cu" >"$out/nvcc.log" 2>&1; then
  cat "$out/nvcc.log" >&2
  echo "sm90_sass_check: nvcc failed on tests/sm90/probe_sm90.cu" >&2
  exit 2
fi
"$cuobjdump" -sass "$cubin" >"$out/probe_sm90.sass" 2>"$out/cuobjdump.err" || {
  cat "$out/cuobjdump.err" >&2; echo "sm90_sass_check: cuobjdump failed" >&2; exit 2; }

count() { grep -cE "^\s+/\*[0-9a-f]+\*/\s+(@!?U?P[0-9T] )?$1" "$out/probe_sm90.sass"; }
rc=0
line="sm90_sass_check: $("$nvcc" --version | grep -o 'release [0-9.]*' | sed 's/^/nvcc /'), sm_90a:"
for op in HGMMA UTMALDG SYNCS USETMAXREG; do
  n=$(count "$op")
  line="$line $op $n,"
  if [ "$op" != USETMAXREG ] && [ "$n" -eq 0 ]; then
    echo "sm90_sass_check: FAIL: no $op in the SASS of probe_sm90 ($out/probe_sm90.sass)" >&2
    rc=1
  fi
done
spills=$(grep -cE "\s(STL|LDL)(\.[A-Z0-9.]+)?\s" "$out/probe_sm90.sass")
echo "$line STL/LDL $spills"
grep -E "ptxas (warning|info) *: (Used|.*C7508|.*spill)" "$out/nvcc.log" | sed 's/^/  /'
if [ "$spills" -ne 0 ]; then echo "sm90_sass_check: FAIL: local-memory spills" >&2; rc=1; fi
exit $rc
