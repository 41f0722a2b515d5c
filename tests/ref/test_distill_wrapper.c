/* ref/distill_wrapper: the public fh_distill_* calls on the CPU backend against the fp64 core
 * (fp32 outputs, state round trip, guard words, accumulate, low-precision dtypes, N = 0) and the
 * hard term against linear cross-entropy. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "test_distill_fixture.h"

#define N_ 29
#define V_ 97
#define DS_ 13
#define VT_ 103
#define DT_ 17
#define NS FH_DISTILL_ROW_STATE

static fh_context_t* cpu(void) {
  fh_context_t* ctx = NULL;
  cr_assert(fh_context_create(&ctx, FH_BACKEND_CPU, 0) == FH_SUCCESS);
  return ctx;
}

/* Public forward + backward (fp32 gradients) against the fp64 core, with guard words after
 * every output. Tolerances: outputs are the core's fp64 values rounded once to fp32
 * (2^-24 relative); the backward recomputes q from the fp32 state, whose lse carries
 * |lse| · 2^-24 absolute error, so q and every gradient entry move by ~|lse| · 6e-8 relative:
 * 2e-6 relative plus 2e-6 of the largest entry covers |lse| up to ~30 with margin. */
static void compare(fh_reduction_t red, fh_distill_divergence_t dv, float hard) {
  fh_context_t* ctx = cpu();
  dfx_t f;
  dfx_init(&f, N_, V_, DS_, VT_, DT_, 31, 1, 1, 3);
  fh_distill_options_t o;
  fh_distill_options_init(&o);
  o.reduction = red, o.divergence = dv, o.hard_weight = hard, o.temperature = 2.0f, o.beta = 0.25f;
  fh_distill_head_t hs, ht;
  dfx_heads(&f, &hs, &ht);
  const int64_t nl = red == FH_REDUCTION_NONE ? N_ : 1;
  float* loss = (float*)tu_alloc_guarded(sizeof(float) * nl);
  float* soft = (float*)tu_alloc_guarded(sizeof(float) * nl);
  float* hardl = (float*)tu_alloc_guarded(sizeof(float) * nl);
  float* st = (float*)tu_alloc_guarded(sizeof(float) * N_ * NS);
  fh_distill_outputs_t out = {loss, st, soft, hardl};
  cr_assert(fh_distill_forward(ctx, &o, &hs, &ht, f.targets, &out, NULL, 0) == FH_SUCCESS, "%s", fh_last_error());
  /* core */
  fh_distill_problem_t p;
  dfx_problem(&f, &o, 1, &p);
  double rl[N_], rs[N_], rh[N_], rst[N_ * NS];
  fh_distill_ref_fwd_t r = {rl, rs, rh, rst, 0, 0, 0, 0, 0};
  cr_assert(fh_ref_distill_forward_f64(&p, &r) == FH_SUCCESS);
  const int none = red == FH_REDUCTION_NONE;
  int ok = tu_check_close_f("loss", loss, none ? rl : &r.loss, nl, 0, 2e-7);
  ok = tu_check_close_f("soft_loss", soft, none ? rs : &r.soft, nl, 0, 2e-7) && ok;
  ok = tu_check_close_f("hard_loss", hardl, none ? rh : &r.hard, nl, 0, 2e-7) && ok;
  ok = tu_check_close_f("row_state", st, rst, N_ * NS, 1e-30, 2e-7) && ok;
  /* loss = hard_weight·hard + soft_weight·soft (fp64 identity before rounding) */
  ok = ok && fabs(r.loss - (hard * r.hard + r.soft)) <= 1e-12 * fabs(r.loss);
  /* backward */
  float gl[N_];
  double gld[N_];
  tu_rng_t rng = {3};
  for (int64_t i = 0; i < N_; ++i) gld[i] = gl[i] = (float)tu_quantize(0.5 + tu_uniform(&rng), 8);
  float* dE = (float*)tu_alloc_guarded(sizeof(float) * N_ * DS_);
  float* dC = (float*)tu_alloc_guarded(sizeof(float) * V_ * DS_);
  float* db = (float*)tu_alloc_guarded(sizeof(float) * V_);
  fh_tensor_t tdE = fh_tensor_2d(dE, FH_DTYPE_F32, N_, DS_), tdC = fh_tensor_2d(dC, FH_DTYPE_F32, V_, DS_),
              tdb = fh_tensor_2d(db, FH_DTYPE_F32, 1, V_);
  fh_distill_grads_t g = {&tdE, &tdC, &tdb};
  fh_distill_grad_inputs_t in = {st, gl};
  cr_assert(fh_distill_backward(ctx, &o, &hs, &ht, f.targets, &in, &g, NULL, 0) == FH_SUCCESS, "%s", fh_last_error());
  double* e64 = (double*)malloc(sizeof(double) * (N_ * DS_ + V_ * DS_ + V_));
  double *c64 = e64 + N_ * DS_, *b64 = c64 + V_ * DS_;
  cr_assert(fh_ref_distill_backward_f64(&p, rst, gld, e64, c64, b64, NULL) == FH_SUCCESS);
  double gm = 0;
  for (int64_t k = 0; k < N_ * DS_ + V_ * DS_ + V_; ++k) gm = fmax(gm, fabs(e64[k]));
  ok = tu_check_close_f("dE", dE, e64, N_ * DS_, 2e-6 * gm, 2e-6) && ok;
  ok = tu_check_close_f("dC", dC, c64, V_ * DS_, 2e-6 * gm, 2e-6) && ok;
  ok = tu_check_close_f("dbias", db, b64, V_, 2e-6 * gm, 2e-6) && ok;
  ok = ok && tu_guards_intact(loss, sizeof(float) * nl) && tu_guards_intact(soft, sizeof(float) * nl) &&
       tu_guards_intact(hardl, sizeof(float) * nl) && tu_guards_intact(st, sizeof(float) * N_ * NS) &&
       tu_guards_intact(dE, sizeof(float) * N_ * DS_) && tu_guards_intact(dC, sizeof(float) * V_ * DS_) &&
       tu_guards_intact(db, sizeof(float) * V_);
  /* accumulate: a second backward adds the same gradient */
  o.accumulate = 1;
  cr_assert(fh_distill_backward(ctx, &o, &hs, &ht, f.targets, &in, &g, NULL, 0) == FH_SUCCESS);
  for (int64_t k = 0; k < N_ * DS_ + V_ * DS_ + V_; ++k) e64[k] *= 2;
  ok = tu_check_close_f("dE accumulated", dE, e64, N_ * DS_, 4e-6 * gm, 2e-6) && ok;
  ok = tu_check_close_f("dbias accumulated", db, b64, V_, 4e-6 * gm, 2e-6) && ok;
  free(loss), free(soft), free(hardl), free(st), free(dE), free(dC), free(db), free(e64);
  dfx_free(&f);
  fh_context_destroy(ctx);
  cr_assert(ok, "public wrapper differs from the fp64 core");
}

Test(ref_distill_wrapper, mean_jsd_with_hard) { compare(FH_REDUCTION_MEAN, FH_DISTILL_JSD, 0.5f); }
Test(ref_distill_wrapper, none_alpha) { compare(FH_REDUCTION_NONE, FH_DISTILL_ALPHA, 0.0f); }
Test(ref_distill_wrapper, sum_reverse_kl) { compare(FH_REDUCTION_SUM, FH_DISTILL_REVERSE_KL, 0.25f); }

/* Student bf16, teacher fp16: the core reads both exactly; bf16 gradient outputs are the core's
 * fp64 values rounded once (≤ 2^-8 relative: half an ulp of an 8-bit significand) after the fp32-state recomputation (≤ 2e-6 of the
 * largest entry, as above). */
Test(ref_distill_wrapper, bf16_student_fp16_teacher) {
  fh_context_t* ctx = cpu();
  dfx_t f;
  dfx_init(&f, N_, V_, DS_, VT_, DT_, 32, 1, 1, 3);
  uint16_t *Es = malloc(2 * N_ * DS_), *Cs = malloc(2 * V_ * DS_), *bs = malloc(2 * V_);
  uint16_t *Et = malloc(2 * N_ * DT_), *Ct = malloc(2 * VT_ * DT_), *bt = malloc(2 * VT_);
  for (int64_t k = 0; k < N_ * DS_; ++k) Es[k] = fh_double_to_bf16_bits(f.Es[k]);
  for (int64_t k = 0; k < V_ * DS_; ++k) Cs[k] = fh_double_to_bf16_bits(f.Cs[k]);
  for (int64_t k = 0; k < V_; ++k) bs[k] = fh_double_to_bf16_bits(f.bs[k]);
  for (int64_t k = 0; k < N_ * DT_; ++k) Et[k] = fh_double_to_half_bits(f.Et[k]);
  for (int64_t k = 0; k < VT_ * DT_; ++k) Ct[k] = fh_double_to_half_bits(f.Ct[k]);
  for (int64_t k = 0; k < VT_; ++k) bt[k] = fh_double_to_half_bits(f.bt[k]);
  fh_tensor_t tEs = fh_tensor_2d(Es, FH_DTYPE_BF16, N_, DS_), tCs = fh_tensor_2d(Cs, FH_DTYPE_BF16, V_, DS_),
              tbs = fh_tensor_2d(bs, FH_DTYPE_BF16, 1, V_), tEt = fh_tensor_2d(Et, FH_DTYPE_F16, N_, DT_),
              tCt = fh_tensor_2d(Ct, FH_DTYPE_F16, VT_, DT_), tbt = fh_tensor_2d(bt, FH_DTYPE_F16, 1, VT_);
  fh_distill_head_t hs = {&tEs, &tCs, &tbs}, ht = {&tEt, &tCt, &tbt};
  fh_distill_options_t o;
  fh_distill_options_init(&o);
  o.divergence = FH_DISTILL_SKEW_FORWARD_KL;
  float loss, st[N_ * NS];
  fh_distill_outputs_t out = {&loss, st, NULL, NULL};
  cr_assert(fh_distill_forward(ctx, &o, &hs, &ht, f.targets, &out, NULL, 0) == FH_SUCCESS, "%s", fh_last_error());
  uint16_t* dC = (uint16_t*)tu_alloc_guarded(2 * V_ * DS_);
  fh_tensor_t tdC = fh_tensor_2d(dC, FH_DTYPE_BF16, V_, DS_);
  fh_distill_grads_t g = {NULL, &tdC, NULL};
  const float one = 1.0f;
  fh_distill_grad_inputs_t in = {st, &one};
  cr_assert(fh_distill_backward(ctx, &o, &hs, &ht, f.targets, &in, &g, NULL, 0) == FH_SUCCESS, "%s", fh_last_error());
  /* core on the same bf16/fp16 tensors */
  fh_distill_problem_t p;
  dfx_problem(&f, &o, 1, &p);
  p.Es = &tEs, p.Cs = &tCs, p.bs = &tbs, p.Et = &tEt, p.Ct = &tCt, p.bt = &tbt;
  double rst[N_ * NS], d1 = 1.0;
  const double L = dfx_loss(&p, &d1, rst);
  double* c64 = (double*)malloc(sizeof(double) * V_ * DS_);
  double dC_got[V_ * DS_], gm = 0;
  cr_assert(fh_ref_distill_backward_f64(&p, rst, &d1, NULL, c64, NULL, NULL) == FH_SUCCESS);
  for (int64_t k = 0; k < V_ * DS_; ++k) dC_got[k] = fh_bf16_bits_to_double(dC[k]), gm = fmax(gm, fabs(c64[k]));
  int ok = tu_check_close_f("loss", &loss, &L, 1, 0, 2e-7);
  ok = tu_check_close("dC bf16", dC_got, c64, V_ * DS_, 2e-6 * gm, 0x1p-8) && ok;
  ok = ok && tu_guards_intact(dC, 2 * V_ * DS_);
  free(Es), free(Cs), free(bs), free(Et), free(Ct), free(bt), free(dC), free(c64);
  dfx_free(&f);
  fh_context_destroy(ctx);
  cr_assert(ok);
}

/* N = 0: success, loss 0, nothing written past the outputs. */
Test(ref_distill_wrapper, empty_batch) {
  fh_context_t* ctx = cpu();
  dfx_t f;
  dfx_init(&f, 0, V_, DS_, VT_, DT_, 33, 0, 1, 0);
  fh_distill_head_t hs, ht;
  dfx_heads(&f, &hs, &ht);
  fh_distill_options_t o;
  fh_distill_options_init(&o);
  float* loss = (float*)tu_alloc_guarded(sizeof(float));
  loss[0] = 123.0f;
  fh_distill_outputs_t out = {loss, NULL, NULL, NULL};
  cr_assert(fh_distill_forward(ctx, &o, &hs, &ht, NULL, &out, NULL, 0) == FH_SUCCESS, "%s", fh_last_error());
  cr_expect(loss[0] == 0.0f && tu_guards_intact(loss, sizeof(float)));
  float* dC = (float*)tu_alloc_guarded(sizeof(float) * V_ * DS_);
  fh_tensor_t tdC = fh_tensor_2d(dC, FH_DTYPE_F32, V_, DS_);
  fh_distill_grads_t g = {NULL, &tdC, NULL};
  const float one = 1.0f, dummy = 0.0f;
  fh_distill_grad_inputs_t in = {&dummy, &one};
  cr_assert(fh_distill_backward(ctx, &o, &hs, &ht, NULL, &in, &g, NULL, 0) == FH_SUCCESS, "%s", fh_last_error());
  float mx = 0;
  for (int64_t k = 0; k < V_ * DS_; ++k) mx = fmaxf(mx, fabsf(dC[k]));
  cr_expect(mx == 0.0f && tu_guards_intact(dC, sizeof(float) * V_ * DS_), "dC of an empty batch must be 0");
  free(loss), free(dC);
  dfx_free(&f);
  fh_context_destroy(ctx);
}

/* hard_weight 1, soft_weight 0: exactly linear cross-entropy of the student head (an
 * independent implementation), loss and gradients. */
Test(ref_distill_wrapper, hard_term_is_linear_ce) {
  fh_context_t* ctx = cpu();
  dfx_t f;
  dfx_init(&f, N_, V_, DS_, VT_, DT_, 34, 1, 1, 4);
  fh_distill_head_t hs, ht;
  dfx_heads(&f, &hs, &ht);
  fh_distill_options_t o;
  fh_distill_options_init(&o);
  o.hard_weight = 1.0f, o.soft_weight = 0.0f, o.temperature = 3.0f;
  float loss, st[N_ * NS];
  fh_distill_outputs_t out = {&loss, st, NULL, NULL};
  cr_assert(fh_distill_forward(ctx, &o, &hs, &ht, f.targets, &out, NULL, 0) == FH_SUCCESS);
  fh_linear_ce_options_t lo;
  fh_linear_ce_options_init(&lo);
  float lce, lse[N_];
  fh_linear_ce_outputs_t lout = {&lce, lse, NULL, NULL, NULL, NULL};
  cr_assert(fh_linear_ce_forward(ctx, &lo, &f.tEs, &f.tCs, &f.tbs, f.targets, NULL, NULL, &lout, NULL, 0) == FH_SUCCESS,
            "%s", fh_last_error());
  const double lce_d = lce;
  int ok = tu_check_close_f("hard vs linear CE", &loss, &lce_d, 1, 0, 1e-6);
  float dE[N_ * DS_], dEl[N_ * DS_];
  fh_tensor_t t1 = fh_tensor_2d(dE, FH_DTYPE_F32, N_, DS_), t2 = fh_tensor_2d(dEl, FH_DTYPE_F32, N_, DS_);
  fh_distill_grads_t g = {&t1, NULL, NULL};
  const float one = 1.0f;
  fh_distill_grad_inputs_t in = {st, &one};
  cr_assert(fh_distill_backward(ctx, &o, &hs, &ht, f.targets, &in, &g, NULL, 0) == FH_SUCCESS);
  fh_linear_ce_grad_inputs_t lin = {lse, NULL, &one, NULL};
  fh_linear_ce_grads_t lg = {&t2, NULL, NULL};
  cr_assert(fh_linear_ce_backward(ctx, &lo, &f.tEs, &f.tCs, &f.tbs, f.targets, NULL, NULL, &lin, &lg, NULL, 0) ==
            FH_SUCCESS);
  double ref[N_ * DS_], gm = 0;
  for (int64_t k = 0; k < N_ * DS_; ++k) ref[k] = dEl[k], gm = fmax(gm, fabs(ref[k]));
  ok = tu_check_close_f("hard dE vs linear CE dE", dE, ref, N_ * DS_, 4e-6 * gm, 4e-6) && ok;
  dfx_free(&f);
  fh_context_destroy(ctx);
  cr_assert(ok);
}
