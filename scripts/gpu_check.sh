#!/usr/bin/env bash
# gpu_check: everything that needs an NVIDIA GPU, in one command (docs/gpu_check.md):
#   1. builds fusedhead for this GPU only (compute capability from nvidia-smi or torch) in build-gpu/:
#      the library, bench_linear_ce and, when Criterion is there (or bundled by
#      scripts/fetch_anchors.sh in third_party/anchors/_criterion), the gpu suite test_gpu;
#   2. runs the gpu suite (ctest -R '^gpu$' -j1) and python/tests (CPU tensors: that suite has no
#      device selection; CUDA tensors are covered by the parity check of step 3);
#   2b. on compute capability 9.0: the gpu suite again with FH_ENGINE=sm80, and bench_linear_ce
#      on both mainloops, the sm_90a one with and without the 2-CTA multicast
#      (build-gpu/gpu_check_engine.csv; docs/hopper.md);
#   3. bench_decode: fused decoding against cuBLAS logits + fh_decode_from_logits at the LLM
#      shapes (build-gpu/gpu_check_decode.csv); then bench/bench_anchors.py: a parity check of the Python binding on CUDA tensors, then fusedhead,
#      the cuBLAS + unfused baseline (bench_linear_ce), eager PyTorch, Liger-Kernel and Cut
#      Cross-Entropy (from third_party/anchors when present) at the CCE and Liger shapes, bf16,
#      forward and forward+backward. Writes build-gpu/gpu_check.csv and build-gpu/gpu_check_summary.md.
# Without a GPU it prints "gpu_check: no NVIDIA GPU: nothing to do" and exits 0 at once.
#
#   bash scripts/gpu_check.sh [--out DIR] [--quick] [--skip-tests]
#     --out DIR     also copy the CSV, the summary and the log into DIR (or set GPU_CHECK_OUT)
#     --quick       fewer timed repetitions (5 instead of 10)
#     --skip-tests  build and benchmark only
#   environment: GPU_CHECK_BUDGET_S (default 460: the whole run aims to end within it),
#     FH_CUDA_ARCHITECTURES (overrides the detected architecture), PYTHON (default python3),
#     FH_GIT_COMMIT (the commit to record when the tree has no .git), GPU_CHECK_JOBS (build jobs, default nproc)
# Exit status 0 when the build, the gpu suite, the Python tests and the parity check passed;
# anchors that fail or are missing are reported in the summary but do not fail the check.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
T0=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-460}
BUILD=build-gpu
PY=${PYTHON:-python3}
OUTDIR=${GPU_CHECK_OUT:-}
REPS=10
WARMUP=3
SKIP_TESTS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUTDIR=${2:?--out needs a directory}; shift ;;
    --quick) REPS=5; WARMUP=2 ;;
    --skip-tests) SKIP_TESTS=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# ---- 0. is there a GPU? (fast, soft) ------------------------------------------------------------
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU: nothing to do (nvidia-smi not found)"
  exit 0
fi
if ! gpus=$(timeout 30 nvidia-smi -L 2>/dev/null) || ! grep -q '^GPU ' <<<"$gpus"; then
  echo "gpu_check: no NVIDIA GPU: nothing to do (nvidia-smi lists none)"
  exit 0
fi

LOGS=$BUILD/gpu_check_logs
mkdir -p "$LOGS"
LOG=$BUILD/gpu_check.log
: >"$LOG"
STEPS=$BUILD/gpu_check_steps.md
: >"$STEPS"
elapsed() { echo $(($(date +%s) - T0)); }
left() { echo $((BUDGET - $(elapsed))); }
# cap WANT: WANT seconds, or what is left of the budget (at least MIN, default 20)
cap() {
  local want=$1 min=${2:-20} l
  l=$(left)
  [ "$l" -lt "$want" ] && want=$l
  [ "$want" -lt "$min" ] && want=$min
  echo "$want"
}
say() { echo "gpu_check: $*" | tee -a "$LOG"; }
step() { echo "- $*" >>"$STEPS"; say "$*"; }
# run_logged NAME TIMEOUT CMD...: output to $LOGS/NAME.log and $LOG; returns the command's status
run_logged() {
  local name=$1 t=$2
  shift 2
  { echo "\$ $*"; } >"$LOGS/$name.log"
  timeout --kill-after=10 "$t" "$@" >>"$LOGS/$name.log" 2>&1
  local rc=$?
  { echo "==== $name (rc $rc) ===="; cat "$LOGS/$name.log"; } >>"$LOG"
  [ "$rc" = 124 ] && echo "(timed out after ${t}s)" >>"$LOGS/$name.log"
  return "$rc"
}

IFS=, read -r GPU_NAME DRIVER MEM <<<"$(timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total \
  --format=csv,noheader -i 0 2>/dev/null | head -1)"
GPU_NAME=$(echo "${GPU_NAME:-unknown}" | sed 's/^ *//;s/ *$//')
DRIVER=$(echo "${DRIVER:-?}" | tr -d ' ')
CC=$(timeout 30 nvidia-smi --query-gpu=compute_cap --format=csv,noheader -i 0 2>/dev/null | head -1 | tr -d ' ')
if ! [[ "$CC" =~ ^[0-9]+\.[0-9]+$ ]]; then
  CC=$(timeout 60 "$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))' 2>/dev/null)
fi
COMMIT=${FH_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export FH_GIT_COMMIT=$COMMIT
say "$GPU_NAME, driver $DRIVER,${MEM:+$MEM,} compute capability ${CC:-unknown}; commit $COMMIT; budget ${BUDGET}s"
{
  echo "# fusedhead GPU check"
  echo
  echo "$GPU_NAME, driver $DRIVER, compute capability ${CC:-unknown}, commit $COMMIT, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "## Steps"
  echo
} >"$STEPS.head"

# ---- 1. build for this GPU only ---------------------------------------------------------------------
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
BUILD_OK=0
TESTS_BUILT=0
if ! command -v nvcc >/dev/null 2>&1; then
  step "build: FAILED (nvcc not found on PATH or in /usr/local/cuda/bin)"
elif [ -z "$CC" ]; then
  step "build: FAILED (no compute capability from nvidia-smi or torch)"
else
  NUM=${CC/./}
  if [ -n "${FH_CUDA_ARCHITECTURES:-}" ]; then
    ARCH=$FH_CUDA_ARCHITECTURES
  else
    case "$NUM" in
      90) ARCH=90a-real ;; # H100 / H200: sm_90a allows the Hopper-only instructions
      *) ARCH=$NUM-real ;;
    esac
    # A GPU newer than this nvcc: PTX for the newest architecture it knows, JIT-compiled by the driver.
    if ! nvcc --list-gpu-code 2>/dev/null | grep -qx "sm_$NUM"; then
      best=$(nvcc --list-gpu-arch 2>/dev/null | sed -n 's/^compute_\([0-9]*\)$/\1/p' |
        awk -v n="$NUM" '$1 <= n' | sort -n | tail -1)
      [ -n "$best" ] && ARCH=$best-virtual
    fi
  fi
  # Criterion for the gpu suite: the machine's, else the bundle from scripts/fetch_anchors.sh
  # (only the libraries this machine lacks are put on the loader path).
  TESTS=OFF
  if [ "$SKIP_TESTS" = 0 ]; then
    if command -v pkg-config >/dev/null 2>&1 && pkg-config --exists criterion 2>/dev/null; then
      TESTS=ON
      CRITERION_FROM="the system"
    elif [ -f third_party/anchors/_criterion/lib/pkgconfig/criterion.pc ]; then
      CR=$ROOT/third_party/anchors/_criterion
      command -v pkg-config >/dev/null 2>&1 || export PATH="$CR/bin:$PATH"
      export PKG_CONFIG_PATH="$CR/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
      MISSING=$ROOT/$BUILD/criterion-deps
      rm -rf "$MISSING" && mkdir -p "$MISSING"
      known=$(ldconfig -p 2>/dev/null)
      for f in "$CR"/lib/deps/*.so*; do
        so=$(basename "$f")
        grep -q "^[[:space:]]*$so " <<<"$known" || ln -sf "$f" "$MISSING/$so"
      done
      export LD_LIBRARY_PATH="$CR/lib:$MISSING${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
      if pkg-config --exists criterion 2>/dev/null; then
        TESTS=ON
        extra_libs=$(ls "$MISSING" | tr '\n' ' ' | sed 's/ $//')
        CRITERION_FROM="third_party/anchors/_criterion, with ${extra_libs:-none} of its libraries"
      fi
    fi
  fi
  GEN=()
  command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
  if [ -f "$BUILD/CMakeCache.txt" ]; then
    want=${GEN[1]:-Unix Makefiles}
    have=$(sed -n 's/^CMAKE_GENERATOR:INTERNAL=//p' "$BUILD/CMakeCache.txt")
    [ "$have" = "$want" ] || rm -rf "$BUILD/CMakeCache.txt" "$BUILD/CMakeFiles"
  fi
  say "configuring for $ARCH (CUDA $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')), tests $TESTS"
  t_build=$(date +%s)
  if run_logged configure "$(cap 120)" cmake -S . -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DFH_ENABLE_CUDA=ON -DFH_CUDA_ARCHITECTURES="$ARCH" -DCMAKE_CUDA_COMPILER="$(command -v nvcc)" \
    -DFH_BUILD_TESTS=$TESTS -DFH_BUILD_BENCH=ON -DFH_BUILD_EMULATOR=OFF; then
    targets=(fusedhead bench_linear_ce bench_decode)
    [ "$TESTS" = ON ] && targets+=(test_gpu)
    if run_logged build "$(cap 300)" cmake --build "$BUILD" -j "${GPU_CHECK_JOBS:-$(nproc)}" --target "${targets[@]}"; then
      BUILD_OK=1
      [ "$TESTS" = ON ] && TESTS_BUILT=1
      step "build: ok, $ARCH, ${targets[*]}, $(($(date +%s) - t_build)) s"
    else
      step "build: FAILED ($LOGS/build.log):"
      tail -25 "$LOGS/build.log" | sed 's/^/    /' | tee -a "$STEPS"
    fi
  else
    step "build: configure FAILED ($LOGS/configure.log):"
    tail -25 "$LOGS/configure.log" | sed 's/^/    /' | tee -a "$STEPS"
  fi
fi

# ---- 2. the gpu suite and the Python tests --------------------------------------------------------
SUITE_OK=0
PYTESTS_OK=0
if [ "$BUILD_OK" = 1 ] && [ "$SKIP_TESTS" = 0 ]; then
  if [ "$TESTS_BUILT" = 1 ]; then
    t=$(date +%s)
    if run_logged gpu_suite "$(cap 150)" ctest --test-dir "$BUILD" -R '^gpu$' -j1 -V; then
      SUITE_OK=1
    fi
    syn=$(grep -o 'Synthesis: .*' "$LOGS/gpu_suite.log" | tail -1 | sed 's/ *$//')
    why=""
    # Every test skips when no CUDA context can be made: on a GPU machine that is a failure.
    if [ "$SUITE_OK" = 1 ] && ! grep -q 'Tested: [1-9]' <<<"$syn"; then
      SUITE_OK=0
      why=" (no test ran: each skipped, so test_gpu could not create a CUDA context)"
    fi
    step "gpu suite (test_gpu, Criterion from ${CRITERION_FROM:-?}): $([ $SUITE_OK = 1 ] && echo ok || echo FAILED)$why, ${syn:-no Criterion synthesis line}, $(($(date +%s) - t)) s"
    [ $SUITE_OK = 1 ] || grep -E '\[(FAIL|----)\]' "$LOGS/gpu_suite.log" | head -20 | sed 's/^/    /' | tee -a "$STEPS"
  else
    step "gpu suite: NOT RUN (no Criterion here and no third_party/anchors/_criterion: run scripts/fetch_anchors.sh where pip and apt work, and carry third_party/anchors)"
  fi
  t=$(date +%s)
  if run_logged python_tests "$(cap 120)" env FUSEDHEAD_LIBRARY="$ROOT/$BUILD/libfusedhead.so" \
    PYTHONDONTWRITEBYTECODE=1 "$PY" python/tests/run_tests.py; then
    PYTESTS_OK=1
  fi
  line=$(grep -E '^python: [0-9]+ passed' "$LOGS/python_tests.log" | tail -1)
  step "python/tests (CPU tensors only: the suite has no device selection): $([ $PYTESTS_OK = 1 ] && echo ok || echo FAILED), ${line:-no result line}, $(($(date +%s) - t)) s"
elif [ "$SKIP_TESTS" = 1 ]; then
  SUITE_OK=1
  PYTESTS_OK=1
  step "gpu suite and python/tests: skipped (--skip-tests)"
fi

# ---- 2b. Hopper: both mainloops of the engine (docs/hopper.md) -----------------------------------
# On compute capability 9.0 the 16-bit GEMM kernels take the sm_90a mainloop (TMA + wgmma);
# FH_ENGINE=sm80 keeps the sm_80 one. The gpu suite above ran the default; here the suite runs
# again on the sm_80 loop, and bench_linear_ce times both at the Liger shape.
if [ "$BUILD_OK" = 1 ] && [ "${NUM:-0}" = 90 ]; then
  ENGINE_CSV=$BUILD/gpu_check_engine.csv
  : >"$ENGINE_CSV"
  if [ "$SKIP_TESTS" = 0 ] && [ "$TESTS_BUILT" = 1 ]; then
    t=$(date +%s)
    ok=0
    FH_ENGINE=sm80 run_logged gpu_suite_sm80 "$(cap 150)" ctest --test-dir "$BUILD" -R '^gpu$' -j1 -V && ok=1
    syn=$(grep -o 'Synthesis: .*' "$LOGS/gpu_suite_sm80.log" | tail -1 | sed 's/ *$//')
    step "gpu suite with FH_ENGINE=sm80 (the sm_80 mainloop on Hopper): $([ $ok = 1 ] && echo ok || echo FAILED), ${syn:-no synthesis line}, $(($(date +%s) - t)) s"
  fi
  # sm90a: the default (the linear CE forward and backward warp-specialized, the forward in 2-CTA
  # clusters with the classifier tile multicast); sm90a_nows: FH_WS=0 (both on the plain sm_90a
  # loop, what the producer warpgroup buys); sm90a_1cta: FH_MULTICAST=0 (one CTA per row block);
  # sm80: the sm_80 loop.
  for eng in sm90a sm90a_nows sm90a_1cta sm80; do
    t=$(date +%s)
    case "$eng" in
      sm80) envs=(env FH_ENGINE=sm80) ;;
      sm90a_1cta) envs=(env -u FH_ENGINE -u FH_WS FH_MULTICAST=0) ;;
      sm90a_nows) envs=(env -u FH_ENGINE -u FH_MULTICAST FH_WS=0) ;;
      *) envs=(env -u FH_ENGINE -u FH_MULTICAST -u FH_WS) ;;
    esac
    if run_logged "bench_engine_$eng" "$(cap 120)" "${envs[@]}" "$BUILD/bench_linear_ce" --gpu-shape 8192 128256 4096 \
      --gpu-reps "$REPS" --warmup "$WARMUP" --reps 1 --cpu-shape 8 64 16; then
      grep -E '^gpu,' "$LOGS/bench_engine_$eng.log" | sed "s/^/$eng,/" >>"$ENGINE_CSV"
      step "bench_linear_ce on the $eng mainloop: done, $(($(date +%s) - t)) s"
    else
      step "bench_linear_ce on the $eng mainloop: FAILED ($LOGS/bench_engine_$eng.log)"
    fi
  done
  [ -s "$ENGINE_CSV" ] && step "engine paths: $(wc -l <"$ENGINE_CSV") rows in $ENGINE_CSV (first column: mainloop)"
fi

# ---- 3a. fused decoding against cuBLAS logits + fh_decode_from_logits (bench/bench_decode.c) -----
DECODE_CSV=$BUILD/gpu_check_decode.csv
DECODE_MD=$BUILD/gpu_check_decode.md
rm -f "$DECODE_CSV" "$DECODE_MD"
if [ "$BUILD_OK" = 1 ]; then
  t=$(date +%s)
  if run_logged bench_decode "$(cap 90)" "$BUILD/bench_decode" --warmup "$WARMUP" --gpu-reps "$REPS" --no-cpu; then
    grep -v '^#' "$LOGS/bench_decode.log" | grep -E '^(kind|gpu),' >"$DECODE_CSV"
    {
      echo "## Fused decoding (bench_decode, bf16, median ms after an L2 flush)"
      echo
      echo "| sampler | B | V | D | impl | ms | spread | HBM floor ms | fallback rows | token mismatches |"
      echo "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"
      awk -F, '$1 == "gpu" { printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $2, $3, $4, $5, $7, $8, $9, $10, $11, $12 }' \
        "$DECODE_CSV"
    } >"$DECODE_MD"
    step "fused decoding bench: done, $(($(date +%s) - t)) s, $(grep -c '^gpu,' "$DECODE_CSV") rows in $DECODE_CSV"
  else
    step "fused decoding bench: FAILED ($LOGS/bench_decode.log)"
    tail -15 "$LOGS/bench_decode.log" | sed 's/^/    /' | tee -a "$STEPS"
  fi
fi

# ---- 3b. parity on CUDA tensors and the timings beside the anchors ----------------------------------
PARITY_OK=0
BENCH_DONE=0
if [ "$BUILD_OK" = 1 ]; then
  export FUSEDHEAD_LIBRARY="$ROOT/$BUILD/libfusedhead.so"
  export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
  [ -d third_party/anchors ] && export PYTHONPATH="$ROOT/third_party/anchors${PYTHONPATH:+:$PYTHONPATH}"
  CSV=$BUILD/gpu_check.csv
  BENCH_MD=$BUILD/gpu_check_bench.md
  rm -f "$CSV" "$CSV.running" "$CSV.parity.txt"
  common=(--device cuda --bench-exe "$BUILD/bench_linear_ce" --csv "$CSV" --summary "$BENCH_MD"
    --warmup "$WARMUP" --reps "$REPS" --method-timeout 90)
  t=$(date +%s)
  extra=()
  for attempt in 1 2 3; do
    l=$(left)
    if [ "$l" -lt 40 ]; then
      say "bench: no time left for attempt $attempt"
      break
    fi
    # --deadline: no method starts after it; the outer timeout leaves room for the watchdog.
    # Streamed (the log keeps everything, the terminal the progress lines).
    timeout --kill-after=10 $((l + 150)) "$PY" bench/bench_anchors.py "${common[@]}" --deadline $((l - 25)) \
      "${extra[@]}" >"$LOGS/bench_$attempt.log" 2>&1 &
    bench_pid=$!
    tail -n +1 -f --pid=$bench_pid "$LOGS/bench_$attempt.log" 2>/dev/null | grep --line-buffered '^bench_anchors:' |
      sed -u 's/^/  /'
    wait $bench_pid
    rc=$?
    { echo "==== bench_$attempt (rc $rc) ===="; cat "$LOGS/bench_$attempt.log"; } >>"$LOG"
    if [ "$rc" = 4 ]; then
      NO_CUDA=1
      break
    fi
    if [ "$rc" = 0 ] || [ "$rc" = 3 ] || [ "$rc" = 2 ]; then
      BENCH_DONE=1
      break
    fi
    say "bench: attempt $attempt ended with status $rc; resuming in a fresh process"
    extra=(--resume --no-parity)
  done
  if [ "$BENCH_DONE" = 0 ] && [ -f "$CSV" ]; then
    "$PY" bench/bench_anchors.py "${common[@]}" --summary-only >>"$LOG" 2>&1
  fi
  # Three lines (fp32, fp16, bf16), each ending in ": ok", when the parity check passed.
  [ -f "$CSV.parity.txt" ] && [ "$(grep -c ': ok$' "$CSV.parity.txt")" = 3 ] && PARITY_OK=1
  step "parity of the Python binding on CUDA tensors (fp32/fp16/bf16 vs fp64): $([ $PARITY_OK = 1 ] && echo ok || echo FAILED)"
  if [ "${NO_CUDA:-0}" = 1 ]; then
    step "timings: NOT RUN ($PY's torch sees no CUDA device)"
  else
    step "timings: $([ $BENCH_DONE = 1 ] && echo "done" || echo incomplete), $(($(date +%s) - t)) s, rows in $CSV"
  fi
fi

# ---- summary ------------------------------------------------------------------------------------
SUMMARY=$BUILD/gpu_check_summary.md
{
  cat "$STEPS.head" "$STEPS"
  echo
  echo "Total $(elapsed) s."
  echo
  [ -f "${BENCH_MD:-/nonexistent}" ] && sed '1s/^# /## /; 2,$s/^## /### /' "$BENCH_MD"
  [ -f "$DECODE_MD" ] && { echo; cat "$DECODE_MD"; }
} >"$SUMMARY"
rm -f "$STEPS.head" "$STEPS"
echo
cat "$SUMMARY"
if [ -n "$OUTDIR" ]; then
  mkdir -p "$OUTDIR" && cp -f "$SUMMARY" "$LOG" "$OUTDIR"/ 2>/dev/null
  [ -f "${CSV:-/nonexistent}" ] && cp -f "$CSV" "$OUTDIR"/
  [ -f "$DECODE_CSV" ] && cp -f "$DECODE_CSV" "$OUTDIR"/
  say "copied the summary, the CSV and the log to $OUTDIR"
fi
say "summary in $SUMMARY ($(elapsed) s)"
if [ "$BUILD_OK" = 1 ] && [ "$SUITE_OK" = 1 ] && [ "$PYTESTS_OK" = 1 ] && [ "$PARITY_OK" = 1 ]; then
  exit 0
fi
exit 1
