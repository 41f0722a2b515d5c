/* kernel_distill_sparse: the sparse (offline) teacher on the CUDA backend (kernels/
 * distill_sparse.cu and the hooks in kernels/distill.cu, distill_bwd.cu) under the SIMT emulator,
 * through the public API, against the fp64 CPU reference with the tolerance rule of
 * test_linear_ce_common.h (test_distill.c's header says what each side computes; the naive side
 * of the sparse teacher is naive_sparse_row in test_distill_common.c: fp32 X at the ids from the
 * naive logits, q_R = 1 − Σ_S q in fp32). Shapes cross the tile edges (N = 130 > 128 rows,
 * V = 300 classes, D_s = 72); K = 17 random ids per row (a third of the rows with some -inf
 * log-probs), K = 1 and K = V; every divergence each mode defines in fp32, fp16 and bf16;
 * ignored rows (their ids are never read); the backward in the three accumulation modes; the
 * device check of ids and log-probs; the workspace formula and the Liger comparison at
 * N = 8192, V = 128256 (README). */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ref/distill_ref.h"
#include "test_distill_common.h"
#include "test_util.h"

static const fh_dtype_t DTYPES[3] = {FH_DTYPE_F32, FH_DTYPE_F16, FH_DTYPE_BF16};
static const char* const DNAME[3] = {"f32", "f16", "bf16"};
#define RN FH_DISTILL_SPARSE_RENORMALIZE
#define RM FH_DISTILL_SPARSE_REMAINDER
#define NO FH_DISTILL_SPARSE_NONE

typedef struct scase {
  const char* name;
  fh_distill_sparse_mass_t mass;
  fh_distill_divergence_t d;
  float param;
} scase_t;
static const scase_t CASES[] = {
    {"renorm fkl", RN, FH_DISTILL_FORWARD_KL, 0},          {"renorm jsd0.3", RN, FH_DISTILL_JSD, 0.3f},
    {"renorm jsd_scaled0.9", RN, FH_DISTILL_JSD_SCALED, 0.9f}, {"renorm tvd", RN, FH_DISTILL_TVD, 0},
    {"renorm skew_fkl0.1", RN, FH_DISTILL_SKEW_FORWARD_KL, 0.1f},
    {"renorm skew_rkl0.3", RN, FH_DISTILL_SKEW_REVERSE_KL, 0.3f},
    {"renorm alpha1", RN, FH_DISTILL_ALPHA, 1.0f},          {"renorm hellinger", RN, FH_DISTILL_HELLINGER, 0},
    {"renorm chi_square", RN, FH_DISTILL_CHI_SQUARE, 0},    {"remainder fkl", RM, FH_DISTILL_FORWARD_KL, 0},
    {"remainder rkl", RM, FH_DISTILL_REVERSE_KL, 0},        {"remainder jsd0.3", RM, FH_DISTILL_JSD, 0.3f},
    {"remainder tvd", RM, FH_DISTILL_TVD, 0},               {"remainder skew_rkl0.3", RM, FH_DISTILL_SKEW_REVERSE_KL, 0.3f},
    {"remainder alpha-0.5", RM, FH_DISTILL_ALPHA, -0.5f},   {"remainder hellinger", RM, FH_DISTILL_HELLINGER, 0},
    {"none fkl", NO, FH_DISTILL_FORWARD_KL, 0},
};
#define NCASES ((int)(sizeof CASES / sizeof CASES[0]))

static fh_distill_options_t sopts(const scase_t* c) {
  fh_distill_options_t o = dk_opts(c->d, c->param);
  o.sparse_mass = c->mass;
  if (c->mass != RN) o.temperature = 1.0f; /* remainder and none need T = 1 */
  return o;
}

static void make(dk_problem_t* P, int di, int64_t N, int64_t V, int64_t K, uint64_t seed, int with_ninf) {
  dk_spec_t s = dk_default(N, V, 72, V, 8, DTYPES[di]);
  s.seed = seed;
  dk_init(P, &s);
  dk_sparse_init(P, K, seed + 1, with_ninf);
}

/* Divergences with f(0) = +inf (reverse KL, alpha <= 0) are +inf, in every computation, on a row
 * whose teacher has a -inf log-prob where the student has mass: those run without -inf entries. */
static int f0_infinite(const fh_distill_options_t* o) {
  fh_div_t dv;
  double t, qa;
  fh_div_resolve(o, &dv);
  fh_div_eval(&dv, 0.0, -INFINITY, &t, &qa);
  return !isfinite(t);
}

/* Every case of CASES in dtype di; the backward (after its forward) cycles the accumulation
 * mode through the cases, reduction none with per-row upstream gradients (dk_make_gl). */
static void run_cases(int di, int backward) {
  dk_problem_t P[2];
  make(&P[0], di, 130, 300, 17, 41 + 2 * (uint64_t)backward, 1);
  make(&P[1], di, 130, 300, 17, 41 + 2 * (uint64_t)backward, 0);
  int ok = 1;
  for (int c = 0; c < NCASES; ++c) {
    fh_distill_options_t o = sopts(&CASES[c]);
    o.accum_mode = (fh_accum_mode_t)(c % 3);
    char label[96];
    snprintf(label, sizeof label, "%s %s", DNAME[di], CASES[c].name);
    const dk_problem_t* Q = &P[f0_infinite(&o)];
    ok &= backward ? dk_check_backward(label, Q, &o, NULL) : dk_check_forward(label, Q, &o, NULL);
  }
  dk_free(&P[0]), dk_free(&P[1]);
  cr_assert(ok, "a comparison failed (see the lines above)");
}

Test(kernel_distill_sparse, forward_f32, .timeout = 1200) { run_cases(0, 0); }
Test(kernel_distill_sparse, forward_f16, .timeout = 1200) { run_cases(1, 0); }
Test(kernel_distill_sparse, forward_bf16, .timeout = 1200) { run_cases(2, 0); }
Test(kernel_distill_sparse, backward_f32, .timeout = 1200) { run_cases(0, 1); }
Test(kernel_distill_sparse, backward_f16, .timeout = 1200) { run_cases(1, 1); }
Test(kernel_distill_sparse, backward_bf16, .timeout = 1200) { run_cases(2, 1); }

/* K = 1 and K = V (no rest bucket), each mass mode, forward and backward in the three
 * accumulation modes; the mean reduction with a hard term. */
Test(kernel_distill_sparse, k1_and_kv_all_modes, .timeout = 1200) {
  static const int64_t KS[2] = {1, 300};
  int ok = 1;
  for (int ki = 0; ki < 2; ++ki)
    for (int di = 0; di < 3; ++di) {
      dk_problem_t P;
      make(&P, di, 130, 300, KS[ki], 47 + (uint64_t)ki, 1);
      for (int m = 0; m < 3; ++m) {
        const scase_t c = {"", (fh_distill_sparse_mass_t)m, m == RM ? FH_DISTILL_JSD : FH_DISTILL_FORWARD_KL, 0.5f};
        fh_distill_options_t o = sopts(&c);
        o.reduction = FH_REDUCTION_MEAN;
        o.accum_mode = (fh_accum_mode_t)((m + di) % 3);
        char label[96];
        snprintf(label, sizeof label, "K=%lld %s mass %d", (long long)KS[ki], DNAME[di], m);
        ok &= dk_check_backward(label, &P, &o, NULL);
      }
      dk_free(&P);
    }
  cr_assert(ok, "a comparison failed (see the lines above)");
}

/* Ignored rows are never read: garbage ids there raise nothing. A valid row with a repeated id,
 * an id outside [0, V), a NaN log-prob, or (remainder) mass above 1 raises the device flag. */
Test(kernel_distill_sparse, device_checks, .timeout = 1200) {
  dk_problem_t P;
  make(&P, 2, 40, 150, 5, 53, 0);
  const int64_t K = P.K;
  cr_assert(P.targets[1] == -100, "row 1 is ignored by dk_default's pattern");
  P.ids[1 * K + 0] = -7, P.ids[1 * K + 1] = 1000, P.lp[1 * K + 2] = NAN;
  fh_distill_options_t o = sopts(&CASES[0]);
  dk_out_t k;
  dk_out_alloc(&k, P.s.N);
  cr_assert_eq(dk_run(&P, &o, &k), FH_SUCCESS, "%s", fh_last_error());
  P.expect_flag = 1;
  for (int bad = 0; bad < 4; ++bad) {
    const int64_t save_id = P.ids[3 * K + 1];
    const float save_lp = P.lp[3 * K + 4], save0 = P.lp[3 * K];
    if (bad == 0) P.ids[3 * K + 1] = P.ids[3 * K + 3];
    if (bad == 1) P.ids[3 * K + 1] = P.s.V;
    if (bad == 2) P.lp[3 * K + 4] = NAN;
    if (bad == 3) P.lp[3 * K] = -1e-4f, P.lp[3 * K + 4] = -0.5f, o.sparse_mass = RM, o.temperature = 1.0f;
    cr_assert_eq(dk_run(&P, &o, &k), FH_SUCCESS, "bad %d: %s", bad, fh_last_error());
    P.ids[3 * K + 1] = save_id, P.lp[3 * K + 4] = save_lp, P.lp[3 * K] = save0;
  }
  dk_out_free(&k);
  dk_free(&P);
}

/* Workspace (no GPU needed) at the Llama-3 8B -> 1B shape, bf16: N = 8192, V = 128256,
 * D_t = 4096, D_s = 2048, against Liger's fused linear JSD (ops/fused_linear_jsd.py), which
 * holds a chunk x V fp32 logit matrix for each head, chunk = next_power_of_2(ceil(N / ceil(V /
 * H))) rows with H = the student's hidden size: 2 · chunk · V · 4 bytes (a lower bound: their
 * log-softmax copies and the gradient chunk come on top), and in the versions with the
 * loss_1d = zeros(N, V) fp32 accumulator N · V · 4 bytes more. The sparse teacher at K = 100 adds
 * 4 N K (forward) and 8 N K (backward). Printed for the README table. */
Test(kernel_distill_sparse, workspace_vs_liger) {
  fh_context_t* ctx = NULL;
  cr_assert_eq(fh_context_create(&ctx, FH_BACKEND_CUDA, 0), FH_SUCCESS, "%s", fh_last_error());
  fh_distill_options_t o;
  fh_distill_options_init(&o);
  const int64_t N = 8192, V = 128256, Dt = 4096, Ds = 2048, K = 100;
  fh_distill_shape_t sh = {N, V, Ds, V, Dt, 0, FH_DTYPE_BF16, FH_DTYPE_BF16};
  size_t fd = 0, bd = 0, fs = 0, bs = 0;
  cr_assert_eq(fh_distill_forward_workspace_size(ctx, &o, &sh, &fd), FH_SUCCESS, "%s", fh_last_error());
  cr_assert_eq(fh_distill_backward_workspace_size(ctx, &o, &sh, &bd), FH_SUCCESS, "%s", fh_last_error());
  sh.K = K, sh.V_t = 0, sh.D_t = 0;
  cr_assert_eq(fh_distill_forward_workspace_size(ctx, &o, &sh, &fs), FH_SUCCESS, "%s", fh_last_error());
  cr_assert_eq(fh_distill_backward_workspace_size(ctx, &o, &sh, &bs), FH_SUCCESS, "%s", fh_last_error());
  cr_expect_eq(fs - fd, (size_t)(4 * N * K), "sparse forward adds 4 N K");
  cr_expect_eq(bs - bd, (size_t)(8 * N * K), "sparse backward adds 8 N K");
  const int64_t inc = (V + Ds - 1) / Ds, rows = (N + inc - 1) / inc;
  int64_t chunk = 1;
  while (chunk < rows) chunk *= 2;
  const double liger = 2.0 * (double)chunk * (double)V * 4.0, MiB = 1048576.0;
  printf("workspace N=8192 V=128256 D_t=4096 D_s=2048 bf16: dense forward %.2f MiB, backward (FH_ACCUM_FP32) "
         "%.2f MiB; sparse K=100 forward %.2f MiB, backward %.2f MiB; Liger FL-JSD chunk %lld: 2 x chunk x V fp32 "
         "logits %.2f MiB (+ N x V fp32 loss_1d %.2f MiB where present)\n",
         fd / MiB, bd / MiB, fs / MiB, bs / MiB, (long long)chunk, liger / MiB, (double)N * (double)V * 4.0 / MiB);
  o.accum_mode = FH_ACCUM_OUTPUT_DTYPE;
  size_t bo = 0;
  cr_assert_eq(fh_distill_backward_workspace_size(ctx, &o, &sh, &bo), FH_SUCCESS, "%s", fh_last_error());
  printf("sparse K=100 backward with FH_ACCUM_OUTPUT_DTYPE: %.2f MiB\n", bo / MiB);
  cr_expect((double)fs < liger / 30.0, "the forward workspace is far below Liger's logit chunks");
  fh_context_destroy(ctx);
}
