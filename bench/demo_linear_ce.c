/* The library's main job on an embedded default problem: a synthetic LM head, forward and
 * backward of fused linear cross-entropy through the CPU reference backend.
 *
 *   demo_linear_ce [N D V]      (default 2048 256 32000)
 *
 * Prints the loss, the token accuracy, gradient norms, wall time, and the memory the call
 * needed next to what materializing the fp32 logits and their gradient would take. */
#define _POSIX_C_SOURCE 199309L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "fusedhead.h"

static uint64_t rng_state = 0x243F6A8885A308D3ull;
static double uniform01(void) {
  uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return (double)((z ^ (z >> 31)) >> 11) * 0x1.0p-53;
}
static double normal01(void) {
  double u = uniform01(), v = uniform01();
  return sqrt(-2.0 * log(u > 1e-300 ? u : 1e-300)) * cos(6.283185307179586 * v);
}
static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
static double norm(const float* x, size_t n) {
  double s = 0;
  for (size_t i = 0; i < n; ++i) s += (double)x[i] * x[i];
  return sqrt(s);
}
static void check(fh_status_t st, const char* what) {
  if (st != FH_SUCCESS) {
    fprintf(stderr, "%s failed: %s (%s)\n", what, fh_status_string(st), fh_last_error());
    exit(1);
  }
}

int main(int argc, char** argv) {
  int64_t N = 2048, D = 256, V = 32000;
  if (argc == 4) {
    N = atoll(argv[1]);
    D = atoll(argv[2]);
    V = atoll(argv[3]);
  } else if (argc != 1) {
    fprintf(stderr, "usage: %s [N D V]\n", argv[0]);
    return 2;
  }
  if (N <= 0 || D <= 0 || V <= 0) {
    fprintf(stderr, "N, D, V must be positive\n");
    return 2;
  }
  printf("fusedhead %s demo: fused linear cross-entropy, CPU reference backend\n", fh_version());
  printf("problem: N=%lld D=%lld V=%lld fp32, every 3rd row peaked, every 16th row ignored\n", (long long)N,
         (long long)D, (long long)V);

  float* E = malloc(sizeof(float) * (size_t)(N * D));
  float* C = malloc(sizeof(float) * (size_t)(V * D));
  float* dE = malloc(sizeof(float) * (size_t)(N * D));
  float* dC = malloc(sizeof(float) * (size_t)(V * D));
  float* lse = malloc(sizeof(float) * (size_t)N);
  int64_t* y = malloc(sizeof(int64_t) * (size_t)N);
  if (!E || !C || !dE || !dC || !lse || !y) {
    fprintf(stderr, "out of host memory\n");
    return 1;
  }
  /* C ~ N(0,1), E ~ N(0,1)/sqrt(D): logits ~ N(0,1). Peaked rows add a component along their
   * target's classifier row so that the target logit sits about 8 above the rest. */
  for (int64_t k = 0; k < V * D; ++k) C[k] = (float)normal01();
  for (int64_t i = 0; i < N; ++i) {
    y[i] = (int64_t)(uniform01() * (double)V);
    for (int64_t k = 0; k < D; ++k) E[i * D + k] = (float)(normal01() / sqrt((double)D));
    if (i % 3 == 0) {
      double cn = 0;
      for (int64_t k = 0; k < D; ++k) cn += (double)C[y[i] * D + k] * C[y[i] * D + k];
      for (int64_t k = 0; k < D; ++k) E[i * D + k] += (float)(8.0 * C[y[i] * D + k] / cn);
    }
    if (i % 16 == 5) y[i] = -100;
  }

  fh_context_t* ctx = NULL;
  check(fh_context_create(&ctx, FH_BACKEND_CPU, 0), "fh_context_create");
  fh_linear_ce_options_t opt;
  fh_linear_ce_options_init(&opt);
  opt.z_loss_scale = 1e-4f;
  fh_tensor_t tE = fh_tensor_2d(E, FH_DTYPE_F32, N, D), tC = fh_tensor_2d(C, FH_DTYPE_F32, V, D);
  fh_tensor_t tdE = fh_tensor_2d(dE, FH_DTYPE_F32, N, D), tdC = fh_tensor_2d(dC, FH_DTYPE_F32, V, D);
  size_t ws_f = 0, ws_b = 0;
  check(fh_linear_ce_forward_workspace_size(ctx, &opt, N, V, D, FH_DTYPE_F32, &ws_f), "workspace query");
  check(fh_linear_ce_backward_workspace_size(ctx, &opt, N, V, D, FH_DTYPE_F32, &ws_b), "workspace query");

  float loss = 0, zl = 0, acc = 0;
  fh_linear_ce_outputs_t out = {&loss, lse, NULL, &zl, NULL, &acc};
  double t0 = now_s();
  check(fh_linear_ce_forward(ctx, &opt, &tE, &tC, NULL, y, NULL, NULL, &out, NULL, 0), "forward");
  double t1 = now_s();
  float one = 1.0f;
  fh_linear_ce_grad_inputs_t gin = {lse, NULL, &one, NULL};
  fh_linear_ce_grads_t g = {&tdE, &tdC, NULL};
  check(fh_linear_ce_backward(ctx, &opt, &tE, &tC, NULL, y, NULL, NULL, &gin, &g, NULL, 0), "backward");
  double t2 = now_s();

  printf("loss (mean CE + z-loss) = %.6f   z-loss part = %.6g   token accuracy = %.4f\n", (double)loss,
         (double)zl, (double)acc);
  printf("|dE| = %.6e   |dC| = %.6e\n", norm(dE, (size_t)(N * D)), norm(dC, (size_t)(V * D)));
  printf("time (CPU reference, fp64): forward %.3f s, backward %.3f s\n", t1 - t0, t2 - t1);
  const double MiB = 1024.0 * 1024.0;
  size_t ws = ws_f > ws_b ? ws_f : ws_b;
  double saved = 4.0 * (double)N;                    /* lse [N] fp32, kept for the backward */
  double logits = 2.0 * 4.0 * (double)N * (double)V; /* fp32 logits + their gradient */
  printf("memory beyond inputs and gradients: workspace %zu B (query) + lse %.3f MiB;"
         " the CPU reference also allocates O(N + V + D) temporaries of its own\n",
         ws, saved / MiB);
  printf("materializing fp32 logits and their gradient would take %.1f MiB\n", logits / MiB);
  int ok = isfinite(loss) && loss > 0;
  fh_context_destroy(ctx);
  free(E), free(C), free(dE), free(dC), free(lse), free(y);
  return ok ? 0 : 1;
}
