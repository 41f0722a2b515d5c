/* kernel_distill: the CUDA distillation forward (kernels/distill.cu) under the SIMT emulator,
 * through the public API, against the fp64 CPU reference (src/ref/distill.c) with the tolerance
 * rule of test_linear_ce_common.h: |kernel − ref| <= 2 |naive − ref| + 2^-24 (D + V) max|ref|,
 * the naive computation being the same math in fp32 on what the tensor core reads (logits summed
 * in fp32 in k order from the fp16/bf16/fp32 values, which the engine reads exactly; softmax
 * statistics, X, Y and the row sums in fp32; each element's term and qa rounded to fp32).
 * Shapes cross the engine's tile edges (128 rows, 128 classes, 64-byte k-stages): N = 130,
 * V = 300, D_s = 72, D_t = 40 and a padded teacher vocabulary V_t = 317 > V; every divergence in
 * fp32, fp16 and bf16; ignored rows; NaN rows confined; the scalar fallback (odd row stride)
 * bitwise equal to the 16-byte path; batch invariance (a row's outputs do not depend on the
 * other rows); N = 0; the workspace formula at the Llama-3 8B -> 1B shape.
 * Backward (kernels/distill_bwd.cu): dEs, dCs, dbs against the fp64 reference backward, each side
 * from its own forward state (kernel: the CUDA forward's fp32 state; naive: its fp32 state, G in
 * fp32 rounded to the operand type before the GEMMs, which sum in fp32; reference: fp64), for
 * several divergences x the three accumulation modes x three dtypes, the accumulate flag, the
 * scalar fallback and reduction none. FH_ACCUM_OUTPUT_DTYPE with 16-bit outputs rounds the
 * running sum once per 128-class tile (dE) or 128-row block (dC): its budget is the naive error
 * times the number of those roundings (rounding errors add at most linearly), as in
 * kernel_linear_ce_bwd. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "distill.h"
#include "dtype.h"
#include "fh_emu.h"
#include "ref/distill_ref.h"
#include "test_distill_common.h"
#include "test_linear_ce_common.h"
#include "test_util.h"

static fh_context_t* cuda_ctx(void) {
  fh_context_t* ctx = NULL;
  cr_assert_eq(fh_context_create(&ctx, FH_BACKEND_CUDA, 0), FH_SUCCESS, "%s", fh_last_error());
  return ctx;
}

static const fh_dtype_t DTYPES[3] = {FH_DTYPE_F32, FH_DTYPE_F16, FH_DTYPE_BF16};
static const char* const DNAME[3] = {"f32", "f16", "bf16"};

typedef struct dcase {
  const char* name;
  fh_distill_divergence_t d;
  float param;
  int plain;
} dcase_t;
static const dcase_t CASES[] = {
    {"fkl", FH_DISTILL_FORWARD_KL, 0, 0},         {"rkl", FH_DISTILL_REVERSE_KL, 0, 0},
    {"jsd0.3", FH_DISTILL_JSD, 0.3f, 0},          {"jsd_b0_kl", FH_DISTILL_JSD, 0.0f, 0},
    {"jsd_b1_plain", FH_DISTILL_JSD, 1.0f, 1},    {"jsd_scaled0.9", FH_DISTILL_JSD_SCALED, 0.9f, 0},
    {"tvd", FH_DISTILL_TVD, 0, 0},                {"skew_fkl0.1", FH_DISTILL_SKEW_FORWARD_KL, 0.1f, 0},
    {"skew_rkl0.3", FH_DISTILL_SKEW_REVERSE_KL, 0.3f, 0}, {"alpha0", FH_DISTILL_ALPHA, 0.0f, 0},
    {"alpha1", FH_DISTILL_ALPHA, 1.0f, 0},        {"alpha-0.5", FH_DISTILL_ALPHA, -0.5f, 0},
    {"hellinger", FH_DISTILL_HELLINGER, 0, 0},    {"chi_square", FH_DISTILL_CHI_SQUARE, 0, 0},
};
#define NCASES ((int)(sizeof CASES / sizeof CASES[0]))

static void run_divergences(int di) {
  dk_spec_t s = dk_default(130, 300, 72, 317, 40, DTYPES[di]);
  dk_problem_t P;
  dk_init(&P, &s);
  int ok = 1;
  for (int c = 0; c < NCASES; ++c) {
    fh_distill_options_t o = dk_opts(CASES[c].d, CASES[c].param);
    if (CASES[c].plain) o.jsd_endpoints = FH_DISTILL_JSD_ENDPOINTS_PLAIN;
    char label[96];
    snprintf(label, sizeof label, "%s %s", DNAME[di], CASES[c].name);
    ok &= dk_check_forward(label, &P, &o, NULL);
  }
  dk_free(&P);
  cr_assert(ok, "a comparison failed (see the lines above)");
}

Test(kernel_distill, divergences_f32, .timeout = 1200) { run_divergences(0); }
Test(kernel_distill, divergences_f16, .timeout = 1200) { run_divergences(1); }
Test(kernel_distill, divergences_bf16, .timeout = 1200) { run_divergences(2); }

/* Reductions (mean, sum, divisor), no targets, T = 1 without T² and every row ignored. */
Test(kernel_distill, reductions, .timeout = 1200) {
  dk_spec_t s = dk_default(37, 150, 24, 150, 16, FH_DTYPE_BF16);
  dk_problem_t P;
  dk_init(&P, &s);
  int ok = 1;
  fh_distill_options_t o = dk_opts(FH_DISTILL_JSD, 0.5f);
  o.reduction = FH_REDUCTION_MEAN;
  ok &= dk_check_forward("mean", &P, &o, NULL);
  o.reduction = FH_REDUCTION_SUM;
  ok &= dk_check_forward("sum", &P, &o, NULL);
  o.reduction = FH_REDUCTION_MEAN, o.divisor = 1000.0f;
  ok &= dk_check_forward("mean/divisor", &P, &o, NULL);
  o.divisor = 0.0f, o.temperature = 1.0f, o.scale_by_t_squared = 0;
  ok &= dk_check_forward("T=1", &P, &o, NULL);
  for (int64_t i = 0; i < P.s.N; ++i) P.targets[i] = -100;
  dk_out_t k;
  dk_out_alloc(&k, P.s.N);
  ok &= dk_check_forward("all ignored", &P, &o, &k);
  cr_expect(k.rloss == 0.0 && k.rsoft == 0.0 && k.rhard == 0.0, "every row ignored: loss 0");
  dk_out_free(&k);
  free(P.targets);
  P.targets = NULL;
  o.hard_weight = 0.0f, o.reduction = FH_REDUCTION_NONE;
  ok &= dk_check_forward("no targets", &P, &o, NULL);
  dk_free(&P);
  cr_assert(ok, "a comparison failed (see the lines above)");
}

/* A NaN row of Es: that row's outputs are NaN, every other row equals the NaN-free run bitwise. */
Test(kernel_distill, nan_row_confined, .timeout = 1200) {
  dk_spec_t s = dk_default(40, 200, 16, 210, 24, FH_DTYPE_F16);
  fh_distill_options_t o = dk_opts(FH_DISTILL_REVERSE_KL, 0);
  dk_problem_t P, Q;
  dk_init(&P, &s);
  s.nan_row = 3;
  dk_init(&Q, &s);
  dk_out_t a, b;
  dk_out_alloc(&a, s.N), dk_out_alloc(&b, s.N);
  cr_assert_eq(dk_run(&P, &o, &a), FH_SUCCESS, "%s", fh_last_error());
  cr_assert_eq(dk_run(&Q, &o, &b), FH_SUCCESS, "%s", fh_last_error());
  for (int64_t i = 0; i < s.N; ++i) {
    if (i == 3) {
      cr_expect(isnan(b.loss[i]) && isnan(b.state[i * NS]), "row 3 is NaN");
      continue;
    }
    cr_expect(lk_same_bits(a.loss + i, b.loss + i, 1) && lk_same_bits(a.state + i * NS, b.state + i * NS, NS),
              "row %lld changed by the NaN row", (long long)i);
  }
  dk_out_free(&a), dk_out_free(&b);
  dk_free(&P), dk_free(&Q);
}

/* The scalar fallback (odd row strides) gives bitwise the 16-byte path's results, and a row's
 * results do not depend on the batch (the first 37 rows alone). */
Test(kernel_distill, fallback_and_batch_invariance, .timeout = 1200) {
  for (int di = 0; di < 3; ++di) {
    dk_spec_t s = dk_default(130, 260, 40, 270, 32, DTYPES[di]);
    fh_distill_options_t o = dk_opts(FH_DISTILL_TVD, 0);
    dk_problem_t P, Q, R;
    dk_init(&P, &s);
    s.pad = 1;
    dk_init(&Q, &s);
    s.pad = 0, s.N = 37;
    dk_init(&R, &s); /* same seed: the first rows are the same values */
    dk_out_t a, b, c;
    dk_out_alloc(&a, 130), dk_out_alloc(&b, 130), dk_out_alloc(&c, 37);
    cr_assert_eq(dk_run(&P, &o, &a), FH_SUCCESS, "%s", fh_last_error());
    cr_assert_eq(dk_run(&Q, &o, &b), FH_SUCCESS, "%s", fh_last_error());
    cr_assert_eq(dk_run(&R, &o, &c), FH_SUCCESS, "%s", fh_last_error());
    cr_expect(lk_same_bits(a.loss, b.loss, 130) && lk_same_bits(a.state, b.state, 130 * NS),
              "%s: scalar fallback differs from the 16-byte path", DNAME[di]);
    int same_rows = 1;
    for (int64_t i = 0; i < 37; ++i) {
      double x[2] = {fh_tensor_get(&P.tEs, i, 0), fh_tensor_get(&P.tEt, i, 0)};
      double y[2] = {fh_tensor_get(&R.tEs, i, 0), fh_tensor_get(&R.tEt, i, 0)};
      same_rows &= x[0] == y[0] && x[1] == y[1];
    }
    if (same_rows)
      cr_expect(lk_same_bits(a.loss, c.loss, 37) && lk_same_bits(a.state, c.state, 37 * NS),
                "%s: a row's results depend on the batch", DNAME[di]);
    dk_out_free(&a), dk_out_free(&b), dk_out_free(&c);
    dk_free(&P), dk_free(&Q), dk_free(&R);
  }
}

static void run_backward(int di) {
  static const dcase_t BC[] = {{"fkl", FH_DISTILL_FORWARD_KL, 0, 0},
                               {"jsd0.3", FH_DISTILL_JSD, 0.3f, 0},
                               {"tvd", FH_DISTILL_TVD, 0, 0},
                               {"skew_rkl0.3", FH_DISTILL_SKEW_REVERSE_KL, 0.3f, 0},
                               {"alpha-0.5", FH_DISTILL_ALPHA, -0.5f, 0}};
  dk_spec_t s = dk_default(130, 300, 72, 317, 40, DTYPES[di]);
  dk_problem_t P;
  dk_init(&P, &s);
  int ok = 1;
  for (int c = 0; c < 5; ++c) {
    fh_distill_options_t o = dk_opts(BC[c].d, BC[c].param);
    o.reduction = c == 0 ? FH_REDUCTION_NONE : FH_REDUCTION_MEAN;
    o.accum_mode = (fh_accum_mode_t)(c % 3);
    char label[96];
    snprintf(label, sizeof label, "%s %s", DNAME[di], BC[c].name);
    ok &= dk_check_backward(label, &P, &o, NULL);
  }
  dk_free(&P);
  cr_assert(ok, "a comparison failed (see the lines above)");
}

Test(kernel_distill, backward_f32, .timeout = 1200) { run_backward(0); }
Test(kernel_distill, backward_f16, .timeout = 1200) { run_backward(1); }
Test(kernel_distill, backward_bf16, .timeout = 1200) { run_backward(2); }

/* Every mode with the accumulate flag, every divergence's gradient once (bf16, small), and the
 * scalar fallback (odd strides, D_s % 8 != 0). */
Test(kernel_distill, backward_modes_divergences_fallback, .timeout = 1200) {
  int ok = 1;
  {
    dk_spec_t s = dk_default(37, 150, 24, 160, 16, FH_DTYPE_BF16);
    dk_problem_t P;
    dk_init(&P, &s);
    dk_grads_t init;
    dk_grads_alloc(&init, &P);
    tu_rng_t r = {5};
    for (int64_t q = 0; q < s.N * s.Ds; ++q) init.dE[q] = dk_round_to(s.dtype, 0.01 * tu_normal(&r));
    for (int64_t q = 0; q < s.V * s.Ds; ++q) init.dC[q] = dk_round_to(s.dtype, 0.01 * tu_normal(&r));
    for (int64_t q = 0; q < s.V; ++q) init.db[q] = dk_round_to(s.dtype, 0.01 * tu_normal(&r));
    for (int m = 0; m < 3; ++m) {
      fh_distill_options_t o = dk_opts(FH_DISTILL_JSD_SCALED, 0.9f);
      o.reduction = FH_REDUCTION_SUM, o.accum_mode = (fh_accum_mode_t)m, o.accumulate = 1;
      ok &= dk_check_backward("accumulate", &P, &o, &init);
    }
    for (int c = 0; c < NCASES; ++c) {
      fh_distill_options_t o = dk_opts(CASES[c].d, CASES[c].param);
      if (CASES[c].plain) o.jsd_endpoints = FH_DISTILL_JSD_ENDPOINTS_PLAIN;
      o.accum_mode = FH_ACCUM_DETERMINISTIC;
      ok &= dk_check_backward(CASES[c].name, &P, &o, NULL);
    }
    dk_grads_free(&init);
    dk_free(&P);
  }
  for (int di = 0; di < 3; ++di) {
    dk_spec_t s = dk_default(70, 200, 19, 200, 13, DTYPES[di]);
    s.pad = 1;
    dk_problem_t P;
    dk_init(&P, &s);
    fh_distill_options_t o = dk_opts(FH_DISTILL_REVERSE_KL, 0);
    o.accum_mode = FH_ACCUM_FP32;
    char label[64];
    snprintf(label, sizeof label, "%s scalar", DNAME[di]);
    ok &= dk_check_backward(label, &P, &o, NULL);
    dk_free(&P);
  }
  cr_assert(ok, "a comparison failed (see the lines above)");
}

/* Bitwise the same forward and (deterministic modes) gradients under two block orders of the
 * emulator; a NaN row of Es leaves the other rows' dE bitwise unchanged (dC and dbias sum over
 * rows, so the NaN reaches them, as in the reference); every row ignored gives zero gradients. */
Test(kernel_distill, block_order_nan_row_ignored, .timeout = 1200) {
  dk_spec_t s = dk_default(130, 260, 24, 270, 16, FH_DTYPE_BF16);
  dk_problem_t P;
  dk_init(&P, &s);
  for (int m = 1; m < 3; ++m) {
    fh_distill_options_t o = dk_opts(FH_DISTILL_JSD, 0.3f);
    o.accum_mode = (fh_accum_mode_t)m;
    dk_out_t f1, f2;
    dk_out_alloc(&f1, s.N), dk_out_alloc(&f2, s.N);
    dk_grads_t g1, g2;
    dk_grads_alloc(&g1, &P), dk_grads_alloc(&g2, &P);
    double* gl = dk_make_gl(&P, &o);
    fh_emu_set_seed(3);
    cr_assert_eq(dk_run(&P, &o, &f1), FH_SUCCESS, "%s", fh_last_error());
    cr_assert_eq(dk_run_backward(&P, &o, f1.state, gl, NULL, &g1), FH_SUCCESS, "%s", fh_last_error());
    fh_emu_set_seed(0xdeadbeef);
    cr_assert_eq(dk_run(&P, &o, &f2), FH_SUCCESS, "%s", fh_last_error());
    cr_assert_eq(dk_run_backward(&P, &o, f2.state, gl, NULL, &g2), FH_SUCCESS, "%s", fh_last_error());
    cr_expect(lk_same_bits(f1.loss, f2.loss, s.N) && lk_same_bits(f1.state, f2.state, s.N * NS),
              "forward differs between block orders");
    cr_expect(lk_same_bits(g1.dE, g2.dE, s.N * s.Ds) && lk_same_bits(g1.dC, g2.dC, s.V * s.Ds) &&
                  lk_same_bits(g1.db, g2.db, s.V),
              "mode %s: gradients differ between block orders", DK_MODE_NAME[m]);
    if (m == FH_ACCUM_DETERMINISTIC) { /* the NaN row against this NaN-free run */
      dk_spec_t sn = s;
      sn.nan_row = 3;
      dk_problem_t Q;
      dk_init(&Q, &sn);
      dk_out_t fq;
      dk_out_alloc(&fq, s.N);
      dk_grads_t gq;
      dk_grads_alloc(&gq, &Q);
      cr_assert_eq(dk_run(&Q, &o, &fq), FH_SUCCESS, "%s", fh_last_error());
      cr_assert_eq(dk_run_backward(&Q, &o, fq.state, gl, NULL, &gq), FH_SUCCESS, "%s", fh_last_error());
      for (int64_t i = 0; i < s.N; ++i) {
        if (i == 3) {
          cr_expect(isnan(gq.dE[i * s.Ds]), "the NaN row's dE is NaN");
          continue;
        }
        cr_expect(lk_same_bits(gq.dE + i * s.Ds, g1.dE + i * s.Ds, s.Ds), "row %lld's dE changed by the NaN row",
                  (long long)i);
      }
      dk_out_free(&fq), dk_grads_free(&gq), dk_free(&Q);
    }
    free(gl);
    dk_out_free(&f1), dk_out_free(&f2), dk_grads_free(&g1), dk_grads_free(&g2);
  }
  fh_emu_set_seed(0);
  for (int64_t i = 0; i < s.N; ++i) P.targets[i] = -100;
  for (int m = 0; m < 3; ++m) {
    fh_distill_options_t o = dk_opts(FH_DISTILL_FORWARD_KL, 0);
    o.accum_mode = (fh_accum_mode_t)m;
    o.reduction = FH_REDUCTION_MEAN;
    dk_grads_t g;
    dk_grads_alloc(&g, &P);
    double* st = calloc((size_t)(s.N * NS), sizeof(double));
    double gl = 1.0;
    cr_assert_eq(dk_run_backward(&P, &o, st, &gl, NULL, &g), FH_SUCCESS, "%s", fh_last_error());
    int zero = 1;
    for (int64_t q = 0; q < s.N * s.Ds; ++q) zero &= g.dE[q] == 0.0;
    for (int64_t q = 0; q < s.V * s.Ds; ++q) zero &= g.dC[q] == 0.0;
    for (int64_t q = 0; q < s.V; ++q) zero &= g.db[q] == 0.0;
    cr_expect(zero, "mode %s: every row ignored must give zero gradients", DK_MODE_NAME[m]);
    free(st);
    dk_grads_free(&g);
  }
  dk_free(&P);
}

/* N = 0: the loss is 0 and nothing else is touched; the workspace formula at the Llama-3
 * 8B -> 1B shape (N = 8192, V = 128256, bf16): 256 + 4N + 16N + 12N + 28·16·N bytes (each
 * piece rounded up to 256), no N x V term; a sparse teacher with K = 8 adds 4 N K. */
Test(kernel_distill, empty_workspace_unsupported) {
  dk_spec_t s = dk_default(0, 50, 8, 50, 8, FH_DTYPE_BF16);
  dk_problem_t P;
  dk_init(&P, &s);
  fh_distill_options_t o = dk_opts(FH_DISTILL_FORWARD_KL, 0);
  o.reduction = FH_REDUCTION_MEAN;
  dk_out_t k;
  dk_out_alloc(&k, 1);
  k.rloss = 7;
  cr_assert_eq(dk_run(&P, &o, &k), FH_SUCCESS, "%s", fh_last_error());
  cr_expect(k.rloss == 0.0, "N = 0: loss %g", k.rloss);
  dk_out_free(&k);
  dk_free(&P);
  fh_context_t* ctx = cuda_ctx();
  fh_distill_shape_t sh = {8192, 128256, 2048, 128256, 4096, 0, FH_DTYPE_BF16, FH_DTYPE_BF16};
  size_t ws = 0;
  cr_assert_eq(fh_distill_forward_workspace_size(ctx, &o, &sh, &ws), FH_SUCCESS, "%s", fh_last_error());
  const size_t want = 256 + 4 * 8192 + 28 * 8192 + 12 * 8192 + 28 * 16 * 8192;
  printf("distill forward workspace at N=8192 V=128256: %zu bytes (%.2f MiB)\n", ws, ws / 1048576.0);
  cr_expect_eq(ws, want, "workspace %zu, formula %zu", ws, want);
  cr_assert_eq(fh_distill_backward_workspace_size(ctx, &o, &sh, &ws), FH_SUCCESS, "%s", fh_last_error());
  printf("distill backward workspace (fp32 mode, bf16) at N=8192 V=128256 D_s=2048: %zu bytes (%.2f MiB)\n", ws,
         ws / 1048576.0);
  sh.K = 8; /* the sparse teacher adds 4 N K (kernel_distill_sparse/workspace_vs_liger) */
  cr_expect_eq(fh_distill_forward_workspace_size(ctx, &o, &sh, &ws), FH_SUCCESS, "%s", fh_last_error());
  cr_expect_eq(ws, want + 4 * 8192 * 8, "sparse workspace %zu", ws);
  fh_context_destroy(ctx);
}
