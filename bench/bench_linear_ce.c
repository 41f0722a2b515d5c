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
 * The GPU timing path (CUDA events, cuBLAS baseline) is not implemented: no GPU was available to
 * validate it, and this program never prints a GPU time. */
#define _POSIX_C_SOURCE 199309L /* clock_gettime under -std=c11 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fusedhead.h"

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

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec * 1e3 + (double)t.tv_nsec * 1e-6;
}

static int cmp_d(const void* a, const void* b) {
  double x = *(const double*)a, y = *(const double*)b;
  return x < y ? -1 : x > y;
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

static void memory(void) {
  fh_context_t* ctx = NULL;
  if (!fh_backend_available(FH_BACKEND_CUDA) || fh_context_create(&ctx, FH_BACKEND_CUDA, 0) != FH_SUCCESS) {
    printf("# memory: the CUDA backend is not built here, so the workspace queries cannot run; the\n"
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
      const double t0 = now_ms();
      fh_status_t s = pass == 0 ? fh_linear_ce_forward(ctx, &o, &tE, &tC, NULL, y, NULL, NULL, &out, NULL, 0)
                                : fh_linear_ce_backward(ctx, &o, &tE, &tC, NULL, y, NULL, NULL, &in, &g, NULL, 0);
      if (s != FH_SUCCESS) die(pass == 0 ? "forward" : "backward");
      if (r >= 0) t[r] = now_ms() - t0;
    }
    qsort(t, (size_t)reps, sizeof(double), cmp_d);
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
  int reps = 5;
  for (int a = 1; a < argc; ++a) {
    if (!strcmp(argv[a], "--cpu-shape") && a + 3 < argc) {
      N = atoll(argv[a + 1]), V = atoll(argv[a + 2]), D = atoll(argv[a + 3]);
      a += 3;
    } else if (!strcmp(argv[a], "--reps") && a + 1 < argc) {
      reps = atoi(argv[++a]);
      if (reps < 1) reps = 1;
    } else {
      fprintf(stderr, "usage: %s [--cpu-shape N V D] [--reps R]\n", argv[0]);
      return 2;
    }
  }
  printf("# bench_linear_ce (fusedhead %s). No GPU timing: projection rows are an analytic roofline\n"
         "# model (peaks from NVIDIA's A100 / H100 datasheets), cpu rows time the CPU reference backend.\n",
         fh_version());
  printf("kind,label,N,V,D,dtype,pass,mode,flops,min_bytes,device,time_ms,spread_ms,tflops,ws_bytes,total_mib,note\n");
  projection();
  memory();
  cpu_run(N, V, D, reps);
  return 0;
}
