#!/usr/bin/env bash
# sass_table.sh: static evidence from the SASS of the built library (docs/sass.md).
# Disassembles every cubin of the library with cuobjdump and writes, per kernel and architecture,
# instruction counts over the whole kernel and over its main loop(s) (HMMA, LDSM, LDGSTS, LDG,
# narrow loads, MUFU, BAR, STL/LDL) with ptxas's resource usage (registers, static shared memory,
# stack, local memory), then checks the rules of docs/engine.md ("Evidence"):
#   (a) no kernel of ours spills (any STL/LDL);
#   (b) the main loop of every GEMM kernel (an fh_eng::vec16 instantiation) has LDGSTS, LDSM and
#       HMMA and no narrow global load; an fh_eng::scalar one has HMMA in a loop; an fh_eng::tma90
#       one (wgmma, on the sm_90a cubin only) has HGMMA and UTMALDG or LDGSTS, no narrow global
#       load, and an unserialized wgmma chain (not gsb0 on every HGMMA); every pattern of
#       scripts/gemm_kernels.txt matches an fh_eng::vec16 kernel on each sm_80 / sm_90a cubin, and
#       every pattern of scripts/gemm_kernels_sm90.txt an fh_eng::tma90 kernel on the sm_90a one.
#
# usage: scripts/sass_table.sh [LIBRARY [OUT_PREFIX]]   default build-test/libfusedhead.so, and
#                                                       OUT_PREFIX = LIBRARY's folder/sass_table:
#                                                       writes OUT_PREFIX.md and OUT_PREFIX.csv
#        scripts/sass_table.sh --self-test              the parser on scripts/testdata (no CUDA)
# env:   FH_SASS_ENFORCE=0   rule (b) is reported, not enforced (spills always fail)
#        FH_SASS_GEMM_ARCHS  architectures where gemm_kernels.txt must match (default "sm_80 sm_90a");
#                            gemm_kernels_sm90.txt is checked when sm_90a is listed; "" checks neither
#        CUOBJDUMP           a cuobjdump to use (it needs nvdisasm beside it or on PATH)
#        FH_TOOLS_DIR        where cuobjdump and nvdisasm are pip-installed (default build-tools/)
# exit:  0 rules hold, 1 a rule is broken, 2 bad input (no library, no cubin, cuobjdump failed),
#        3 cuobjdump/nvdisasm missing and could not be installed (scripts/test.sh: a failure
#        under CI=true, a warning otherwise).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
py=""
for p in "$(command -v python3 || true)" /usr/bin/python3; do
  if [ -n "$p" ] && "$p" -c 'import sys; sys.exit(sys.version_info < (3, 7))' 2>/dev/null; then py="$p"; break; fi
done
if [ -z "$py" ]; then echo "sass_table: ERROR: no working python3 (3.7 or later)" >&2; exit 2; fi

if [ "${1:-}" = "--self-test" ]; then
  exec "$py" "$here/sass_table.py" --self-test
fi

lib="${1:-$root/build-test/libfusedhead.so}"
if [ ! -f "$lib" ]; then
  echo "sass_table: $lib not found (build the library first)" >&2
  exit 2
fi
out="${2:-$(dirname "$lib")/sass_table}"

# ---- cuobjdump (and nvdisasm, which its -sass runs): on PATH, in the CUDA toolkit, or pip ----
. "$here/find_cuobjdump.sh"
fh_find_cuobjdump sass_table "$root" "$py" || exit 3
echo "sass_table: $("$cuobjdump" --version | grep -o 'release [0-9.]*' | head -n 1 | sed 's/^/cuobjdump /'), $lib"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
if ! "$cuobjdump" -sass "$lib" >"$tmp/sass" 2>"$tmp/err" ||
   ! "$cuobjdump" -res-usage "$lib" >"$tmp/res" 2>>"$tmp/err"; then
  cat "$tmp/err" >&2
  echo "sass_table: cuobjdump failed on $lib" >&2
  exit 2
fi
if ! grep -q 'Function :' "$tmp/sass"; then
  echo "sass_table: no SASS in $lib (is the CUDA backend built?)" >&2
  exit 2
fi
"$py" "$here/sass_table.py" --sass "$tmp/sass" --res "$tmp/res" \
  --patterns "$here/gemm_kernels.txt" --patterns-sm90 "$here/gemm_kernels_sm90.txt" --md "$out.md" --csv "$out.csv"
rc=$?
echo "sass_table: full table in $out.md and $out.csv"
exit $rc
