/* bench_linear_ce: cost model, memory and CPU-backend timing of fused linear cross-entropy.
 *
 * Without a GPU (this build) it prints, as CSV on stdout (lines starting with '#' are comments;
 * scripts/lce_table.py turns the CSV into markdown tables):
 *   kind=projection  the analytic cost model at the CCE Gemma-2 shape (N=8192, D=2304, V=256000)
 *                    and Liger's shapes (H=4096, V=128256, N in 4096..32768), bf16: tensor-core
 *                    FLOPs of each pass, the minimal (compulsory) HBM bytes, and the roofline time
 *                    max(FLOPs / peak, bytes / bandwidth) on an A100-SXM4-80GB and an H100 SXM.
 *                    These are PROJECTIONS, not measurements.
 *   kind=memory      workspace bytes from fh_linear_ce_*_workspace_size on a CUDA context, plus
 *                    the gradients, for each accumulation mode (only when the CUDA backend is
 *                    built; otherwise see test_kernel kernel_linear_ce_bwd/workspace_at_published_shapes).
 *   kind=cpu         measured wall time of the CPU reference backend at a small shape (median of
 *                    --reps runs after one warm-up, spread = max − min).
 * FLOP formulas (per pass, N_valid rows): forward 2·N·V·D (logits); backward, FH_ACCUM_FP32
 * 6·N·V·D (recompute + dE + dC GEMMs); FH_ACCUM_DETERMINISTIC / OUTPUT_DTYPE 8·N·V·D (the
 * logits are recomputed by the row-owner and the class-owner kernels). Minimal bytes: forward
 * reads E and C once and targets (8 B/row), writes lse (4 B/row); backward also writes dE, dC.
 * Peaks (dense, no sparsity), from NVIDIA's datasheets: A100 80GB SXM 312 TFLOP/s BF16 Tensor
 * Core, 2.0 TB/s HBM2e (datasheet: 2,039 GB/s); H100 SXM 989 TFLOP/s BF16 Tensor Core (1,979 with
 * sparsity), 3.35 TB/s HBM3.
 *   kind=gpu         (only when the CUDA backend is built and a device exists) measured with CUDA
 *                    events on the default stream: forward, backward and forward+backward of
 *                    fusedhead in each accumulation mode and of the baseline (kernels/baseline_lce.h:
 *                    cuBLAS logits + unfused row-wise cross-entropy + cuBLAS gradient GEMMs), bf16,
 *                    mean over the rows, at the shapes above; --warmup runs, then --gpu-reps timed
 *                    runs, each after an L2 flush (a memset of one preallocated buffer of 2x the L2
 *                    size, outside the timed region); time_ms = median, spread_ms = max − min;
 *                    tflops = flops / median with each implementation's own FLOP count (baseline:
 *                    forward 2·N·V·D, backward 4·N·V·D); gbs = min_bytes / median; ws_bytes = the
 *                    workspace query (baseline: its logits buffer), total_mib = workspace plus the
 *                    bf16 gradients for passes with a backward. A baseline backward needs fresh
 *                    logits, so an untimed baseline forward precedes each of its timed backwards.
 *                    The first repeat's baseline loss is compared with fusedhead's (relative
 *                    difference printed as a '# validate' line and in the note). A shape or an
 *                    implementation is skipped (a '# skip' line) when cudaMemGetInfo reports too
 *                    little free memory. Without a device nothing of this runs and no GPU time is
 *                    printed. */
#define _POSIX_C_SOURCE 199309L /* clock_gettime under -std=c11 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_util.h"
#include "fusedhead.h"
#ifdef FH_HAVE_CUDA
#include "../kernels/baseline_lce.h"
#include "bench_cuda.h"
#endif

typedef struct gpu {
  const char* name;
  double tflops, tbs;
} gpu_t;
static const gpu_t GPUS[2] = {{"A100-SXM4-80GB", 312.0, 2.0}, {"H100-SXM", 989.0, 3.35}};

typedef struct shape {
  const char* label;
  int64_t N, V, D;
} shape_t;
static const shape_t SHAPES[5] = {{"cce-gemma2", 8192, 256000, 2304},
                                  {"liger", 4096, 128256, 4096},
                                  {"liger", 8192, 128256, 4096},
                                  {"liger", 16384, 128256, 4096},
                                  {"liger", 32768, 128256, 4096}};

static void die(const char* what) {
  fprintf(stderr, "bench_linear_ce: %s: %s\n", what, fh_last_error());
  exit(1);
}

static void projection(void) {
  const double b = 2.0; /* bf16 */
  for (int s = 0; s < 5; ++s) {
    const shape_t* sh = &SHAPES[s];
    const double N = (double)sh->N, V = (double)sh->V, D = (double)sh->D;
    const double in_bytes = (N + V) * D * b + 12.0 * N, grad_bytes = (N + V) * D * b;
    struct {
      const char* pass;
      const char* mode;
      double flops, bytes;
    } rows[5] = {{"forward", "-", 2 * N * V * D, in_bytes},
                 {"backward", "fp32", 6 * N * V * D, in_bytes + grad_bytes},
                 {"backward", "deterministic", 8 * N * V * D, in_bytes + grad_bytes},
                 {"forward+backward", "fp32", 8 * N * V * D, 2 * in_bytes + grad_bytes},
                 {"forward+backward", "deterministic", 10 * N * V * D, 2 * in_bytes + grad_bytes}};
    for (int r = 0; r < 5; ++r)
      for (int g = 0; g < 2; ++g) {
        const double tc = rows[r].flops / (GPUS[g].tflops * 1e12), tm = rows[r].bytes / (GPUS[g].tbs * 1e12);
        const double t = tc > tm ? tc : tm;
        printf("projection,%s,%lld,%lld,%lld,bf16,%s,%s,%.6e,%.6e,%s,%.3f,,%.1f,,,%s-bound roofline projection\n",
               sh->label, (long long)sh->N, (long long)sh->V, (long long)sh->D, rows[r].pass, rows[r].mode,
               rows[r].flops, rows[r].bytes, GPUS[g].name, t * 1e3, rows[r].flops / t / 1e12,
               tc > tm ? "compute" : "memory");
      }
  }
}

/* kind=engine: the tile engine's cost model (docs/engine.md "Cost model"), bf16. Per pass, the
 * issued tensor-core FLOPs (128 x 128 CTA tiles; the live-tile padding is < 1% here), the bytes
 * the CTAs move between L2 and the SMs, and the time bound of each side: FLOPs at the mma.sync
 * ceiling, L2 bytes at an assumed L2-to-SM bandwidth. Bytes per (row block, class tile), D
 * columns: forward (128 + 128)·D·2 (E block and C tile); backward FP32 mode adds the dC
 * GEMM's E block 128·D·2 and its split-fp32 read-modify-write 128·D·8, the dE GEMM's C tile
 * 128·D·2 and its fp32 atomics 128·D·4. PROJECTIONS with stated ASSUMPTIONS (mma.sync reaching
 * 80% of the dense peak on an A100 and 60% on an H100; L2 delivering 5.5 and 7.5 TB/s): a GPU
 * check replaces them with measurements. */
static void engine_model(void) {
  /* mc: multicast of the classifier tile across a 2-CTA cluster (two row blocks share one C
   * tile, so each CTA reads half of it from L2; docs/hopper.md "Multicast of the classifier
   * tile"): built for the forward's tiles, not for the backward's, whose row is the saving it
   * would bring. */
  static const struct {
    const char* name;
    double tflops, mma_frac, l2_tbs;
    int mc;
  } G[4] = {{"A100-SXM4-80GB sm_80 (mma.sync 80%)", 312.0, 0.80, 5.5, 0},
            {"H100-SXM sm_80 loop (mma.sync 60%)", 989.0, 0.60, 7.5, 0},
            {"H100-SXM sm_90a loop (wgmma 75%)", 989.0, 0.75, 7.5, 0},
            {"H100-SXM sm_90a + 2-CTA multicast of C (forward built; backward not)", 989.0, 0.75, 7.5, 1}};
  for (int s = 0; s < 5; ++s) {
    const shape_t* sh = &SHAPES[s];
    const double N = (double)sh->N, V = (double)sh->V, D = (double)sh->D;
    const double tiles = ceil(N / 128.0) * ceil(V / 128.0);
    /* bytes per tile and element of D: the logits read 128 rows of E and 128 of C (2 bytes each);
     * the backward adds C again for dE (256), the dC split-fp32 read-modify-write (1024), E for dC
     * (256) and dE's read-modify-write (512). Multicast halves the logits' C part (-128). */
    const struct {
      const char* pass;
      double flops, l2, l2_mc;
    } rows[2] = {{"forward", 2 * N * V * D, tiles * 512.0 * D, tiles * 384.0 * D},
                 {"backward-fp32", 6 * N * V * D, tiles * D * (512.0 + 256.0 + 1024.0 + 256.0 + 512.0),
                  tiles * D * (384.0 + 256.0 + 1024.0 + 256.0 + 512.0)}};
    for (int r = 0; r < 2; ++r)
      for (int g = 0; g < 4; ++g) {
        const double l2 = G[g].mc ? rows[r].l2_mc : rows[r].l2;
        const double tc = rows[r].flops / (G[g].tflops * G[g].mma_frac * 1e12), tl = l2 / (G[g].l2_tbs * 1e12);
        printf("engine,%s,%lld,%lld,%lld,bf16,%s,%.4e,%.4e,%s,%.1f,%.1f,%s-bound projection (assumed mma %.0f%%, L2 %.1f TB/s)\n",
               sh->label, (long long)sh->N, (long long)sh->V, (long long)sh->D, rows[r].pass, rows[r].flops, l2,
               G[g].name, tc * 1e3, tl * 1e3, tc > tl ? "mma" : "L2", 100 * G[g].mma_frac, G[g].l2_tbs);
      }
  }
}

static void memory(void) {
  fh_context_t* ctx = NULL;
  if (!fh_backend_available(FH_BACKEND_CUDA) || fh_context_create(&ctx, FH_BACKEND_CUDA, 0) != FH_SUCCESS) {
    printf("# memory: no CUDA context here (backend not built or no device), so the workspace queries cannot run; the\n"
           "# emulator build prints them: test_kernel --filter 'kernel_linear_ce_bwd/workspace*' --verbose\n");
    return;
  }
  static const char* const MODES[3] = {"fp32", "output_dtype", "deterministic"};
  for (int s = 0; s < 5; ++s) {
    const shape_t* sh = &SHAPES[s];
    fh_linear_ce_options_t o;
    fh_linear_ce_options_init(&o);
    size_t ws = 0;
    if (fh_linear_ce_forward_workspace_size(ctx, &o, sh->N, sh->V, sh->D, FH_DTYPE_BF16, &ws) != FH_SUCCESS)
      die("forward workspace query");
    printf("memory,%s,%lld,%lld,%lld,bf16,forward,-,,,,,,,%zu,%.3f,workspace query\n", sh->label, (long long)sh->N,
           (long long)sh->V, (long long)sh->D, ws, ws / 1048576.0);
    const double grads = 2.0 * (double)(sh->N + sh->V) * (double)sh->D / 1048576.0;
    for (int m = 0; m < 3; ++m) {
      o.accum_mode = (fh_accum_mode_t)m;
      if (fh_linear_ce_backward_workspace_size(ctx, &o, sh->N, sh->V, sh->D, FH_DTYPE_BF16, &ws) != FH_SUCCESS)
        die("backward workspace query");
      printf("memory,%s,%lld,%lld,%lld,bf16,backward,%s,,,,,,,%zu,%.3f,workspace query + bf16 gradients\n", sh->label,
             (long long)sh->N, (long long)sh->V, (long long)sh->D, MODES[m], ws, ws / 1048576.0 + grads);
    }
  }
  fh_context_destroy(ctx);
}

#ifdef FH_HAVE_CUDA
/* ---- GPU timing (see the file comment) ---------------------------------------------------- */
enum { PASS_FWD = 0, PASS_BWD = 1, PASS_BOTH = 2 };
static const char* const PASS_NAME[3] = {"forward", "backward", "forward+backward"};
static const char* const MODE_NAME[3] = {"fp32", "output_dtype", "deterministic"};

typedef struct gpu_run {
  fh_context_t* ctx;
  const shape_t* sh;
  const char* device; /* the GPU's name */
  fh_tensor_t E, C, dE, dC;
  int64_t* y;
  float *lse, *loss, *gl; /* device */
  void* ws;               /* fusedhead workspace (largest of the queries) or baseline workspace */
  size_t ws_bytes;
  void* flush;
  size_t flush_bytes;
  fh_linear_ce_options_t opt;
  fh_baseline_lce_args_t base;
  int warmup, reps;
  double* t;
} gpu_run_t;

/* One call of the pass; `impl` 0 fusedhead, 1 baseline. */
static fh_status_t gpu_call(gpu_run_t* g, int impl, int pass) {
  fh_status_t s = FH_SUCCESS;
  if (pass != PASS_BWD) {
    if (impl == 0) {
      fh_linear_ce_outputs_t out = {g->loss, g->lse, NULL, NULL, NULL, NULL};
      s = fh_linear_ce_forward(g->ctx, &g->opt, &g->E, &g->C, NULL, g->y, NULL, NULL, &out, g->ws, g->ws_bytes);
    } else {
      s = fh_baseline_lce_forward(g->ctx, &g->base, g->loss, g->ws, g->ws_bytes);
    }
  }
  if (s == FH_SUCCESS && pass != PASS_FWD) {
    if (impl == 0) {
      fh_linear_ce_grad_inputs_t in = {g->lse, NULL, g->gl, NULL};
      fh_linear_ce_grads_t gr = {&g->dE, &g->dC, NULL};
      s = fh_linear_ce_backward(g->ctx, &g->opt, &g->E, &g->C, NULL, g->y, NULL, NULL, &in, &gr, g->ws, g->ws_bytes);
    } else {
      s = fh_baseline_lce_backward(g->ctx, &g->base, g->gl, g->dE.data, g->dE.row_stride, g->dC.data,
                                   g->dC.row_stride, NULL, g->ws, g->ws_bytes);
    }
  }
  return s;
}

/* Times one (implementation, mode, pass); prints its CSV row. Returns the first repeat's loss
 * (NAN for a backward-only pass). */
static double gpu_time(gpu_run_t* g, int impl, int mode, int pass, bc_timer_t* timer) {
  const shape_t* sh = g->sh;
  double first_loss = NAN;
  if (impl == 0 && pass == PASS_BWD && gpu_call(g, 0, PASS_FWD) != FH_SUCCESS) die("fusedhead forward (lse)");
  for (int r = -g->warmup; r < g->reps; ++r) {
    if (impl == 1 && pass == PASS_BWD && gpu_call(g, 1, PASS_FWD) != FH_SUCCESS) die("baseline forward (logits)");
    if (bc_memset(g->flush, r & 0xff, g->flush_bytes)) die("L2 flush memset");
    if (bc_timer_start(timer)) die("cudaEventRecord");
    if (gpu_call(g, impl, pass) != FH_SUCCESS) die(impl == 0 ? "fusedhead" : "baseline");
    const double ms = bc_timer_stop_ms(timer);
    if (ms < 0) die("CUDA event timing");
    if (r >= 0) g->t[r] = ms;
    if (r == 0 && pass != PASS_BWD) {
      float l = NAN;
      if (bc_copy_to_host(&l, g->loss, sizeof l)) die("cudaMemcpy of the loss");
      first_loss = l;
    }
  }
  if (fh_context_check(g->ctx) != FH_SUCCESS) die("device error flag");
  qsort(g->t, (size_t)g->reps, sizeof(double), bu_cmp_double);
  const double N = (double)sh->N, V = (double)sh->V, D = (double)sh->D, b = 2.0;
  const double in_bytes = (N + V) * D * b + 12.0 * N, grad_bytes = (N + V) * D * b;
  const double fwd = 2.0, bwd = impl == 1 ? 4.0 : mode == FH_ACCUM_FP32 ? 6.0 : 8.0;
  const double flops = (pass == PASS_FWD ? fwd : pass == PASS_BWD ? bwd : fwd + bwd) * N * V * D;
  const double bytes = pass == PASS_FWD ? in_bytes : pass == PASS_BWD ? in_bytes + grad_bytes : 2 * in_bytes + grad_bytes;
  size_t ws = 0;
  if (impl == 1) {
    if (fh_baseline_lce_workspace_size(sh->N, sh->V, FH_DTYPE_BF16, &ws) != FH_SUCCESS) die("baseline workspace");
  } else if (pass == PASS_FWD) {
    if (fh_linear_ce_forward_workspace_size(g->ctx, &g->opt, sh->N, sh->V, sh->D, FH_DTYPE_BF16, &ws) != FH_SUCCESS)
      die("forward workspace query");
  } else {
    size_t wf = 0;
    if (fh_linear_ce_forward_workspace_size(g->ctx, &g->opt, sh->N, sh->V, sh->D, FH_DTYPE_BF16, &wf) != FH_SUCCESS ||
        fh_linear_ce_backward_workspace_size(g->ctx, &g->opt, sh->N, sh->V, sh->D, FH_DTYPE_BF16, &ws) != FH_SUCCESS)
      die("workspace query");
    if (pass == PASS_BOTH && wf > ws) ws = wf;
  }
  const double total = ws / 1048576.0 + (pass == PASS_FWD ? 0.0 : grad_bytes / 1048576.0);
  const double med = g->t[g->reps / 2];
  printf("gpu,%s,%lld,%lld,%lld,bf16,%s,%s,%.6e,%.6e,%s,%.4f,%.4f,%.2f,%zu,%.1f,measured: median of %d after %d "
         "warm-up (CUDA events; L2 flushed),%.1f\n",
         sh->label, (long long)sh->N, (long long)sh->V, (long long)sh->D, PASS_NAME[pass],
         impl == 1 ? "baseline" : pass == PASS_FWD ? "-" : MODE_NAME[mode], flops, bytes, g->device, med,
         g->t[g->reps - 1] - g->t[0], flops / (med * 1e-3) / 1e12, ws, total, g->reps, g->warmup, bytes / (med * 1e-3) / 1e9);
  fflush(stdout);
  return first_loss;
}

static void gpu_shape(fh_context_t* ctx, const shape_t* sh, const char* devname, size_t l2, int warmup, int reps) {
  gpu_run_t g;
  memset(&g, 0, sizeof g);
  g.ctx = ctx, g.sh = sh, g.device = devname, g.warmup = warmup, g.reps = reps;
  const int64_t N = sh->N, V = sh->V, D = sh->D;
  const size_t eb = 2 * (size_t)(N * D), cb = 2 * (size_t)(V * D);
  fh_linear_ce_options_init(&g.opt);
  size_t ws_max = 0, w = 0, bws = 0;
  if (fh_linear_ce_forward_workspace_size(ctx, &g.opt, N, V, D, FH_DTYPE_BF16, &ws_max) != FH_SUCCESS) die("workspace");
  for (int m = 0; m < 3; ++m) {
    g.opt.accum_mode = (fh_accum_mode_t)m;
    if (fh_linear_ce_backward_workspace_size(ctx, &g.opt, N, V, D, FH_DTYPE_BF16, &w) != FH_SUCCESS) die("workspace");
    if (w > ws_max) ws_max = w;
  }
  if (fh_baseline_lce_workspace_size(N, V, FH_DTYPE_BF16, &bws) != FH_SUCCESS) die("baseline workspace");
  g.flush_bytes = 2 * (l2 > 0 ? l2 : (size_t)64 << 20);
  const size_t common = 2 * (eb + cb) + 8 * (size_t)N + 4 * (size_t)N + 8 + g.flush_bytes;
  const size_t margin = (size_t)256 << 20; /* cuBLAS / CUB internal allocations and fragmentation */
  size_t freeb = 0, totalb = 0;
  if (bc_mem_info(&freeb, &totalb)) die("cudaMemGetInfo");
  if (common + ws_max + margin > freeb) {
    printf("# skip %s N=%lld: needs %.0f MiB for inputs, gradients and workspace, %.0f MiB free\n", sh->label,
           (long long)N, (common + ws_max + margin) / 1048576.0, freeb / 1048576.0);
    return;
  }
  void* E = bc_malloc(eb);
  void* C = bc_malloc(cb);
  void* dE = bc_malloc(eb);
  void* dC = bc_malloc(cb);
  g.y = bc_malloc(8 * (size_t)N);
  g.lse = bc_malloc(4 * (size_t)N);
  g.loss = bc_malloc(4);
  g.gl = bc_malloc(4);
  g.flush = bc_malloc(g.flush_bytes);
  g.t = malloc(sizeof(double) * (size_t)reps);
  if (!E || !C || !dE || !dC || !g.y || !g.lse || !g.loss || !g.gl || !g.flush || !g.t) die("device allocation");
  const float one = 1.0f;
  /* logits of standard deviation about 2: E ~ U(-1, 1), C ~ 6/sqrt(D)·U(-1, 1) */
  if (bc_fill_uniform(E, FH_DTYPE_BF16, N * D, 1.0f, 1) || bc_fill_uniform(C, FH_DTYPE_BF16, V * D, 6.0f / sqrtf((float)D), 2) ||
      bc_fill_targets(g.y, N, V, 3) || bc_copy_to_device(g.gl, &one, sizeof one) || bc_sync())
    die("input initialization");
  g.E = fh_tensor_2d(E, FH_DTYPE_BF16, N, D), g.C = fh_tensor_2d(C, FH_DTYPE_BF16, V, D);
  g.dE = fh_tensor_2d(dE, FH_DTYPE_BF16, N, D), g.dC = fh_tensor_2d(dC, FH_DTYPE_BF16, V, D);
  g.base.N = N, g.base.V = V, g.base.D = D, g.base.dtype = FH_DTYPE_BF16;
  g.base.E = E, g.base.lde = D, g.base.C = C, g.base.ldc = D;
  g.base.targets = g.y, g.base.ignore_index = g.opt.ignore_index, g.base.reduction = FH_REDUCTION_MEAN;
  bc_timer_t* timer = bc_timer_create();
  if (!timer) die("cudaEventCreate");

  double fh_loss = NAN, base_loss = NAN;
  g.ws_bytes = ws_max;
  g.ws = bc_malloc(ws_max);
  if (!g.ws) die("fusedhead workspace allocation");
  for (int pass = 0; pass < 3; ++pass)
    for (int m = 0; m < (pass == PASS_FWD ? 1 : 3); ++m) {
      g.opt.accum_mode = (fh_accum_mode_t)m;
      const double l = gpu_time(&g, 0, m, pass, timer);
      if (pass == PASS_FWD) fh_loss = l;
    }
  bc_free(g.ws);
  g.ws = NULL;
  if (bc_mem_info(&freeb, &totalb)) die("cudaMemGetInfo");
  if (bws + margin > freeb) {
    printf("# skip baseline %s N=%lld: its logits workspace needs %.0f MiB, %.0f MiB free\n", sh->label, (long long)N,
           bws / 1048576.0, freeb / 1048576.0);
  } else if ((g.ws = bc_malloc(bws)) == NULL) {
    printf("# skip baseline %s N=%lld: cudaMalloc of %.0f MiB failed\n", sh->label, (long long)N, bws / 1048576.0);
  } else {
    g.ws_bytes = bws;
    for (int pass = 0; pass < 3; ++pass) {
      const double l = gpu_time(&g, 1, 0, pass, timer);
      if (pass == PASS_FWD) base_loss = l;
    }
    printf("# validate %s N=%lld: fusedhead loss %.7g, baseline loss %.7g, relative difference %.3e\n", sh->label,
           (long long)N, fh_loss, base_loss, fabs(base_loss - fh_loss) / fabs(fh_loss));
  }
  bc_timer_destroy(timer);
  bc_free(g.ws), bc_free(E), bc_free(C), bc_free(dE), bc_free(dC), bc_free(g.y), bc_free(g.lse), bc_free(g.loss);
  bc_free(g.gl), bc_free(g.flush);
  free(g.t);
}

/* Times every shape (or only `custom`) when a device exists. */
static void gpu_bench(int warmup, int reps, const shape_t* custom) {
  fh_context_t* ctx = NULL;
  if (fh_context_create(&ctx, FH_BACKEND_CUDA, 0) != FH_SUCCESS) {
    printf("# gpu: no CUDA device (%s): no GPU timing; see the projection rows\n", fh_last_error());
    return;
  }
  bc_device_info_t di;
  if (bc_device_info(0, &di)) die("cudaGetDeviceProperties");
  printf("# device: %s (sm_%d%d), SM clock %d MHz, memory clock %d MHz, %.1f GiB, L2 %.0f MiB, driver %d, runtime %d\n",
         di.name, di.cc_major, di.cc_minor, di.sm_clock_mhz, di.mem_clock_mhz, di.total_mem / 1073741824.0,
         di.l2_bytes / 1048576.0, di.driver_version, di.runtime_version);
  if (custom) gpu_shape(ctx, custom, di.name, di.l2_bytes, warmup, reps);
  else
    for (int s = 0; s < 5; ++s) gpu_shape(ctx, &SHAPES[s], di.name, di.l2_bytes, warmup, reps);
  fh_context_destroy(ctx);
}
#endif

static void cpu_run(int64_t N, int64_t V, int64_t D, int reps) {
  fh_context_t* ctx = NULL;
  if (fh_context_create(&ctx, FH_BACKEND_CPU, 0) != FH_SUCCESS) die("context");
  float* E = malloc(sizeof(float) * (size_t)(N * D));
  float* C = malloc(sizeof(float) * (size_t)(V * D));
  float* dE = malloc(sizeof(float) * (size_t)(N * D));
  float* dC = malloc(sizeof(float) * (size_t)(V * D));
  int64_t* y = malloc(sizeof(int64_t) * (size_t)N);
  float* lse = malloc(sizeof(float) * (size_t)N);
  if (!E || !C || !dE || !dC || !y || !lse) die("out of memory");
  uint64_t st = 42;
  for (int64_t k = 0; k < N * D; ++k) st = st * 6364136223846793005ull + 1, E[k] = (float)((st >> 40) % 1000) / 2000.0f - 0.25f;
  for (int64_t k = 0; k < V * D; ++k) st = st * 6364136223846793005ull + 1, C[k] = (float)((st >> 40) % 1000) / 2000.0f - 0.25f;
  for (int64_t i = 0; i < N; ++i) st = st * 6364136223846793005ull + 1, y[i] = (int64_t)((st >> 33) % (uint64_t)V);
  fh_tensor_t tE = fh_tensor_2d(E, FH_DTYPE_F32, N, D), tC = fh_tensor_2d(C, FH_DTYPE_F32, V, D);
  fh_tensor_t gE = fh_tensor_2d(dE, FH_DTYPE_F32, N, D), gC = fh_tensor_2d(dC, FH_DTYPE_F32, V, D);
  fh_linear_ce_options_t o;
  fh_linear_ce_options_init(&o);
  float loss = 0, gl = 1.0f;
  fh_linear_ce_outputs_t out = {&loss, lse, NULL, NULL, NULL, NULL};
  fh_linear_ce_grad_inputs_t in = {lse, NULL, &gl, NULL};
  fh_linear_ce_grads_t g = {&gE, &gC, NULL};
  double* t = malloc(sizeof(double) * (size_t)(reps + 1));
  for (int pass = 0; pass < 2; ++pass) {
    for (int r = -1; r < reps; ++r) { /* r = -1: warm-up */
      const double t0 = bu_now_ms();
      fh_status_t s = pass == 0 ? fh_linear_ce_forward(ctx, &o, &tE, &tC, NULL, y, NULL, NULL, &out, NULL, 0)
                                : fh_linear_ce_backward(ctx, &o, &tE, &tC, NULL, y, NULL, NULL, &in, &g, NULL, 0);
      if (s != FH_SUCCESS) die(pass == 0 ? "forward" : "backward");
      if (r >= 0) t[r] = bu_now_ms() - t0;
    }
    qsort(t, (size_t)reps, sizeof(double), bu_cmp_double);
    /* the reference computes logits in fp64 scalar code: forward 2NVD, backward 8NVD (it
     * recomputes the logits for dE and again for dC) */
    const double flops = (pass == 0 ? 2.0 : 8.0) * (double)N * (double)V * (double)D;
    printf("cpu,small,%lld,%lld,%lld,f32,%s,reference,%.6e,,cpu-reference-backend,%.3f,%.3f,%.6f,,,"
           "measured: median of %d (fp64 scalar reference; not a GPU number)\n",
           (long long)N, (long long)V, (long long)D, pass == 0 ? "forward" : "backward", flops, t[reps / 2],
           t[reps - 1] - t[0], flops / (t[reps / 2] * 1e-3) / 1e12, reps);
  }
  free(t), free(E), free(C), free(dE), free(dC), free(y), free(lse);
  fh_context_destroy(ctx);
}

int main(int argc, char** argv) {
  int64_t N = 256, V = 2048, D = 256;
  int reps = 5, gpu_reps = 10, warmup = 3;
  shape_t custom = {"custom", 0, 0, 0};
  for (int a = 1; a < argc; ++a) {
    if (!strcmp(argv[a], "--cpu-shape") && a + 3 < argc) {
      N = atoll(argv[a + 1]), V = atoll(argv[a + 2]), D = atoll(argv[a + 3]);
      a += 3;
    } else if (!strcmp(argv[a], "--reps") && a + 1 < argc) {
      reps = atoi(argv[++a]);
      if (reps < 1) reps = 1;
    } else if (!strcmp(argv[a], "--gpu-reps") && a + 1 < argc) {
      gpu_reps = atoi(argv[++a]);
      if (gpu_reps < 1) gpu_reps = 1;
    } else if (!strcmp(argv[a], "--gpu-shape") && a + 3 < argc) {
      custom.N = atoll(argv[a + 1]), custom.V = atoll(argv[a + 2]), custom.D = atoll(argv[a + 3]);
      a += 3;
      if (custom.N < 1 || custom.V < 1 || custom.D < 1) {
        fprintf(stderr, "--gpu-shape: N, V, D must be >= 1\n");
        return 2;
      }
    } else if (!strcmp(argv[a], "--warmup") && a + 1 < argc) {
      warmup = atoi(argv[++a]);
      if (warmup < 0) warmup = 0;
    } else {
      fprintf(stderr, "usage: %s [--cpu-shape N V D] [--reps R] [--gpu-reps R] [--warmup W] [--gpu-shape N V D]\n", argv[0]);
      return 2;
    }
  }
  printf("# bench_linear_ce (fusedhead %s, commit %s). projection rows are an analytic roofline model (peaks\n"
         "# from NVIDIA's A100 / H100 datasheets), not measurements; gpu rows are CUDA-event measurements\n"
         "# (only with a device); cpu rows time the CPU reference backend.\n",
         fh_version(), FH_GIT_COMMIT);
  printf("kind,label,N,V,D,dtype,pass,mode,flops,min_bytes,device,time_ms,spread_ms,tflops,ws_bytes,total_mib,note,"
         "gbs\n");
  projection();
  printf("# kind,label,N,V,D,dtype,pass,flops,l2_bytes,gpu,mma_ms,l2_ms,note\n");
  engine_model();
  memory();
#ifdef FH_HAVE_CUDA
  gpu_bench(warmup, gpu_reps, custom.N > 0 ? &custom : NULL);
#else
  (void)warmup, (void)gpu_reps, (void)custom;
  printf("# gpu: the CUDA backend is not built: no GPU timing; see the projection rows\n");
#endif
  cpu_run(N, V, D, reps);
  return 0;
}
