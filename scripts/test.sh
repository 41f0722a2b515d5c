#!/usr/bin/env bash
# Build fusedhead and run every test suite (no GPU needed):
#   bash scripts/test.sh
# 1. the library as users build it (CUDA backend when nvcc is present), warnings as errors, in
#    build-test/: the ref/ and api/ suites, the installed-package consumer check (CMake and
#    pkg-config, shared and static), README's code blocks (scripts/check_readme.sh), a demo run,
#    and the PyTorch bindings' tests (python/tests, with Debian's python3-torch);
# 2. everything again under AddressSanitizer + UBSan, in build-san/, including the SIMT emulator
#    and the kernel suites that run kernels/*.cu on the CPU;
# 3. with nvcc present: ptxas statistics for sm_80 and sm_90 (spills fail), a test of build 2.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
bash scripts/setup.sh || exit 1
. scripts/env.sh
jobs=$(nproc)
logdir="$root/build-logs"
mkdir -p "$logdir"
failed=0
summary=()

run_ctest() { # name builddir [ctest args]
  local name=$1 dir=$2
  shift 2
  local log="$logdir/ctest-$name.log"
  (cd "$dir" && ctest -V "$@") >"$log" 2>&1
  local rc=$?
  grep -E 'Synthesis|\[FAIL\]|install check: OK|tests passed|tests failed' "$log" | sed "s/^/[$name] /"
  if [ $rc -ne 0 ]; then
    echo "[$name] FAILED: last lines of $log:"
    grep -E '\[FAIL\]|FAILURE|ERROR|Assertion|AddressSanitizer|runtime error' "$log" | head -n 60
    tail -n 60 "$log"
    failed=1
  fi
  summary+=("$log")
}

step() { echo; echo "=== $*"; }

# Build progress on the terminal (one line per finished target), the full output in the log.
build_logged() { # log cmake-args...
  local log=$1
  shift
  cmake --build "$@" 2>&1 | tee -a "$log" |
    { grep --line-buffered -E '^\[ *[0-9]+%\] Built target' | sed -u 's/^/    /'; true; }
}
t_start=$(date +%s)

step "build 1: default configuration, -Werror, in build-test/"
if ! { cmake -S . -B build-test -DFH_WERROR=ON -DFH_BUILD_EMULATOR=OFF -DCMAKE_BUILD_TYPE=Release \
         >"$logdir/build1.log" 2>&1 &&
       build_logged "$logdir/build1.log" build-test -j"$jobs"; }; then
  tail -n 80 "$logdir/build1.log"; echo "build 1 failed"; exit 1
fi
grep -E 'fusedhead:' "$logdir/build1.log" || true
run_ctest default build-test
step "demo smoke run (small shape)"
./build-test/demo_linear_ce 64 40 1001 || failed=1

step "python: PyTorch integration (python3-torch, Debian's /usr/bin/python3)"
pylog="$logdir/python.log"
bash scripts/test_python.sh build-test >"$pylog" 2>&1 || { failed=1; tail -n 60 "$pylog"; }
grep '^python: ' "$pylog" | tail -n 1

step "README: its C block built against the installed package, its Python block run (scripts/check_readme.sh)"
rmlog="$logdir/readme.log"
bash scripts/check_readme.sh build-test >"$rmlog" 2>&1 || { failed=1; tail -n 60 "$rmlog"; }
grep '^readme: ' "$rmlog"

step "build 2: AddressSanitizer + UBSan, emulator and kernel suites, in build-san/"
if ! { cmake -S . -B build-san -DFH_WERROR=ON -DFH_ENABLE_CUDA=OFF -DFH_BUILD_BENCH=OFF \
         -DFH_SANITIZE=address,undefined -DCMAKE_BUILD_TYPE=RelWithDebInfo >"$logdir/build2.log" 2>&1 &&
       build_logged "$logdir/build2.log" build-san -j"$jobs"; }; then
  tail -n 80 "$logdir/build2.log"; echo "build 2 failed"; exit 1
fi
grep -E 'fusedhead:' "$logdir/build2.log" || true
ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 run_ctest sanitized build-san

# The ptxas table is a ctest of build 2 (tests/emu/CMakeLists.txt) when nvcc is present.
if [ -f build-san/ptxas_stats.md ]; then
  step "ptxas statistics (sm_80, sm_90): $(grep -c '^| [a-z_]*\.cu' build-san/ptxas_stats.md) kernel rows, in build-san/ptxas_stats.md"
  grep -v '(library)' build-san/ptxas_stats.md
fi

# SASS evidence (docs/sass.md): the parser's self-test always; with nvcc, the cubins of build 1
# (cuobjdump is pip-installed when missing: exit 3 when it cannot be, a failure under CI=true).
step "SASS evidence: GEMM main loops and spills (scripts/sass_table.sh)"
bash scripts/sass_table.sh --self-test || failed=1
if command -v nvcc >/dev/null && [ -f build-test/libfusedhead.so ]; then
  # The cubins whose expected GEMM kernels are checked: those build 1 made (80-real -> sm_80,
  # 90a-real -> sm_90a, ...), unless FH_SASS_GEMM_ARCHS says otherwise.
  archs=$(sed -n 's/^FH_CUDA_ARCHITECTURES:[A-Z]*=//p' build-test/CMakeCache.txt | tr ';' '\n' |
    sed -n 's/^\([0-9]*a\{0,1\}\)-real$/sm_\1/p; s/^\([0-9]*a\{0,1\}\)$/sm_\1/p' | tr '\n' ' ')
  FH_SASS_GEMM_ARCHS=${FH_SASS_GEMM_ARCHS:-$archs} FH_SASS_ENFORCE=${FH_SASS_ENFORCE:-1} \
    bash scripts/sass_table.sh build-test/libfusedhead.so; rc=$?
  if [ $rc -eq 3 ] && [ "${CI:-}" != true ]; then echo "sass: skipped (no cuobjdump)";
  elif [ $rc -ne 0 ]; then failed=1; fi
fi

# Hopper wrappers (docs/hopper.md): tests/sm90/probe_sm90.cu for sm_90a, SASS must show HGMMA,
# UTMALDG and SYNCS (about 10 s; exit 3, no nvcc or cuobjdump, is a skip outside CI).
if command -v nvcc >/dev/null; then
  step "SASS evidence: Hopper wrappers (scripts/sm90_sass_check.sh)"
  bash scripts/sm90_sass_check.sh; rc=$?
  if [ $rc -eq 3 ] && [ "${CI:-}" != true ]; then echo "sm90 sass: skipped (no cuobjdump)";
  elif [ $rc -ne 0 ]; then failed=1; fi
fi

# One closing line over every Criterion run: "N passed, N failed".
pass=0; fail=0
for log in "${summary[@]}"; do
  while read -r t p f c; do
    pass=$((pass + p)); fail=$((fail + f + c))
  done < <(sed -n 's/.*Synthesis: Tested: \([0-9]*\) | Passing: \([0-9]*\) | Failing: \([0-9]*\) | Crashing: \([0-9]*\).*/\1 \2 \3 \4/p' "$log")
done
if [ -f "$pylog" ]; then
  read -r p f < <(sed -n 's/^python: \([0-9]*\) passed, \([0-9]*\) failed$/\1 \2/p' "$pylog" | tail -n 1) || true
  pass=$((pass + ${p:-0})); fail=$((fail + ${f:-0}))
fi
if [ -f "$rmlog" ]; then
  read -r p f < <(sed -n 's/^readme: \([0-9]*\) passed, \([0-9]*\) failed$/\1 \2/p' "$rmlog" | tail -n 1) || true
  pass=$((pass + ${p:-0})); fail=$((fail + ${f:-0}))
fi
[ $failed -eq 0 ] || [ $fail -gt 0 ] || fail=1
echo
echo "tests: $pass passed, $fail failed ($(( $(date +%s) - t_start )) s)"
exit $failed
