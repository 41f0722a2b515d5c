/* ref/distill_grad: the fp64 reference's student gradients against finite differences of its
 * own fp64 loss, for every divergence and every option, on odd shapes (N=29, D_s=13, D_t=17,
 * V=97, V_t=103) with peaked rows, biases and ignored rows. */
#include <criterion/criterion.h>
#include <stdlib.h>

#include "test_distill_fixture.h"

#define N_ 29
#define V_ 97
#define DS_ 13
#define VT_ 103
#define DT_ 17

static fh_distill_options_t opts(fh_distill_divergence_t dv) {
  fh_distill_options_t o;
  fh_distill_options_init(&o);
  o.divergence = dv;
  o.temperature = 1.5f; /* T != 1 everywhere so the 1/T chain factor and κ = T² are exercised */
  return o;
}

/* Dense teacher; targets are passed (marking ignored rows) unless hard loss is off and
 * `no_targets` is set. */
static void fd_dense(const char* name, const fh_distill_options_t* o, int no_targets, int bias, uint64_t seed) {
  dfx_t f;
  dfx_init(&f, N_, V_, DS_, VT_, DT_, seed, 1, bias, 3);
  fh_distill_problem_t p;
  dfx_problem(&f, o, !no_targets, &p);
  const int ok = dfx_check_fd(&f, &p, name, seed + 1);
  dfx_free(&f);
  cr_assert(ok, "%s: gradient disagrees with finite differences", name);
}

#define FD_TEST(tname, dv, field, value)                 \
  Test(ref_distill_grad, tname) {                        \
    fh_distill_options_t o = opts(dv);                   \
    field = value;                                       \
    fd_dense(#tname, &o, 0, 1, 0x5eed0 + __LINE__);      \
  }

FD_TEST(forward_kl, FH_DISTILL_FORWARD_KL, o.beta, 0.5f)
FD_TEST(reverse_kl, FH_DISTILL_REVERSE_KL, o.beta, 0.5f)
FD_TEST(jsd_beta_0_3, FH_DISTILL_JSD, o.beta, 0.3f)
FD_TEST(jsd_liger_beta_0, FH_DISTILL_JSD, o.beta, 0.0f)
FD_TEST(jsd_liger_beta_1, FH_DISTILL_JSD, o.beta, 1.0f)
FD_TEST(jsd_scaled_beta_0_7, FH_DISTILL_JSD_SCALED, o.beta, 0.7f)
FD_TEST(jsd_scaled_beta_1e_3, FH_DISTILL_JSD_SCALED, o.beta, 1e-3f)
FD_TEST(jsd_scaled_beta_0, FH_DISTILL_JSD_SCALED, o.beta, 0.0f)
FD_TEST(jsd_scaled_beta_1, FH_DISTILL_JSD_SCALED, o.beta, 1.0f)
FD_TEST(tvd, FH_DISTILL_TVD, o.beta, 0.5f)
FD_TEST(skew_forward_kl, FH_DISTILL_SKEW_FORWARD_KL, o.skew, 0.25f)
FD_TEST(skew_reverse_kl, FH_DISTILL_SKEW_REVERSE_KL, o.skew, 0.4f)
FD_TEST(alpha_0_3, FH_DISTILL_ALPHA, o.alpha, 0.3f)
FD_TEST(alpha_0_8, FH_DISTILL_ALPHA, o.alpha, 0.8f)
FD_TEST(alpha_minus_0_5, FH_DISTILL_ALPHA, o.alpha, -0.5f)
FD_TEST(alpha_1_5, FH_DISTILL_ALPHA, o.alpha, 1.5f)
FD_TEST(alpha_0, FH_DISTILL_ALPHA, o.alpha, 0.0f)
FD_TEST(alpha_1, FH_DISTILL_ALPHA, o.alpha, 1.0f)
FD_TEST(hellinger, FH_DISTILL_HELLINGER, o.beta, 0.5f)
FD_TEST(chi_square, FH_DISTILL_CHI_SQUARE, o.beta, 0.5f)

/* Options, on forward KL and on a divergence that needs the Σ q a term (JSD). */
FD_TEST(no_t_squared, FH_DISTILL_JSD, o.scale_by_t_squared, 0)
FD_TEST(temperature_0_6, FH_DISTILL_FORWARD_KL, o.temperature, 0.6f)
FD_TEST(reduction_sum, FH_DISTILL_JSD, o.reduction, FH_REDUCTION_SUM)
FD_TEST(reduction_none, FH_DISTILL_JSD, o.reduction, FH_REDUCTION_NONE)
FD_TEST(divisor, FH_DISTILL_REVERSE_KL, o.divisor, 64.0f)
FD_TEST(soft_weight_negative, FH_DISTILL_ALPHA, o.soft_weight, -0.75f)

Test(ref_distill_grad, hard_and_soft) {
  fh_distill_options_t o = opts(FH_DISTILL_JSD);
  o.hard_weight = 0.3f;
  o.soft_weight = 0.7f;
  fd_dense("hard_and_soft", &o, 0, 1, 11);
}

Test(ref_distill_grad, hard_only_reduction_none) {
  fh_distill_options_t o = opts(FH_DISTILL_FORWARD_KL);
  o.hard_weight = 1.0f;
  o.soft_weight = 0.0f;
  o.reduction = FH_REDUCTION_NONE;
  fd_dense("hard_only_reduction_none", &o, 0, 1, 12);
}

Test(ref_distill_grad, no_bias_no_targets) {
  fh_distill_options_t o = opts(FH_DISTILL_SKEW_REVERSE_KL);
  fd_dense("no_bias_no_targets", &o, 1, 0, 13);
}

/* Sparse teacher: K ids per row drawn from the dense teacher's distribution support, with the
 * teacher's true log-probabilities (T = 1), so the remainder is the real tail mass. */
static void fd_sparse_opts(const char* name, const fh_distill_options_t* o, uint64_t seed) {
  enum { K = 11 };
  dfx_t f;
  dfx_init(&f, N_, V_, DS_, VT_, DT_, seed, 1, 1, 3);
  tu_rng_t r = {7};
  int64_t* ids = (int64_t*)malloc(sizeof(int64_t) * N_ * K);
  float* lp = (float*)malloc(sizeof(float) * N_ * K);
  for (int64_t i = 0; i < N_; ++i) {
    /* distinct ids: a random start and stride coprime with V = 97 (prime) */
    const int64_t a = tu_randint(&r, V_), st = 1 + tu_randint(&r, V_ - 1);
    for (int64_t k = 0; k < K; ++k) {
      ids[i * K + k] = (a + k * st) % V_;
      /* log-probs summing to < 1: softmax over K + 3 slots, the 3 extra ones are the tail */
      lp[i * K + k] = (float)tu_quantize(-2.0 - 2.0 * tu_uniform(&r), 12);
    }
  }
  fh_distill_problem_t p;
  dfx_problem(&f, o, 1, &p);
  p.sparse = 1, p.K = K, p.ids = ids, p.logprobs = lp;
  p.Et = p.Ct = p.bt = NULL;
  const int ok = dfx_check_fd(&f, &p, name, 5);
  free(ids);
  free(lp);
  dfx_free(&f);
  cr_assert(ok, "%s: gradient disagrees with finite differences", name);
}

static void fd_sparse(const char* name, fh_distill_sparse_mass_t mass, float T, float hard) {
  fh_distill_options_t o;
  fh_distill_options_init(&o);
  o.sparse_mass = mass;
  o.temperature = T;
  o.hard_weight = hard;
  fd_sparse_opts(name, &o, 99 + (uint64_t)mass);
}

Test(ref_distill_grad, sparse_renormalize) { fd_sparse("sparse_renormalize", FH_DISTILL_SPARSE_RENORMALIZE, 1.7f, 0.0f); }
Test(ref_distill_grad, sparse_remainder) { fd_sparse("sparse_remainder", FH_DISTILL_SPARSE_REMAINDER, 1.0f, 0.0f); }
Test(ref_distill_grad, sparse_remainder_hard) { fd_sparse("sparse_remainder_hard", FH_DISTILL_SPARSE_REMAINDER, 1.0f, 0.5f); }
Test(ref_distill_grad, sparse_none) { fd_sparse("sparse_none", FH_DISTILL_SPARSE_NONE, 1.0f, 0.0f); }
Test(ref_distill_grad, sparse_none_hard) { fd_sparse("sparse_none_hard", FH_DISTILL_SPARSE_NONE, 1.0f, 0.5f); }

/* Every divergence the sparse teacher defines, in both modes that have a rest bucket
 * (renormalize: ρ = 0 and T = 1.7; remainder: T = 1). */
#define FD_SPARSE(tname, mass, T, dv, field, value)           \
  Test(ref_distill_grad, sparse_##tname) {                    \
    fh_distill_options_t o = opts(dv);                        \
    o.sparse_mass = mass, o.temperature = T, field = value;   \
    fd_sparse_opts("sparse_" #tname, &o, 0x5a0 + __LINE__);   \
  }
#define RN FH_DISTILL_SPARSE_RENORMALIZE
#define RM FH_DISTILL_SPARSE_REMAINDER
FD_SPARSE(renorm_jsd, RN, 1.7f, FH_DISTILL_JSD, o.beta, 0.3f)
FD_SPARSE(renorm_jsd_scaled, RN, 1.7f, FH_DISTILL_JSD_SCALED, o.beta, 0.7f)
FD_SPARSE(renorm_tvd, RN, 1.7f, FH_DISTILL_TVD, o.beta, 0.5f)
FD_SPARSE(renorm_skew_fkl, RN, 1.7f, FH_DISTILL_SKEW_FORWARD_KL, o.skew, 0.25f)
FD_SPARSE(renorm_skew_rkl, RN, 1.7f, FH_DISTILL_SKEW_REVERSE_KL, o.skew, 0.4f)
FD_SPARSE(renorm_alpha_0_3, RN, 1.7f, FH_DISTILL_ALPHA, o.alpha, 0.3f)
FD_SPARSE(renorm_hellinger, RN, 1.7f, FH_DISTILL_HELLINGER, o.beta, 0.5f)
FD_SPARSE(renorm_chi_square, RN, 1.7f, FH_DISTILL_CHI_SQUARE, o.beta, 0.5f)
FD_SPARSE(remainder_reverse_kl, RM, 1.0f, FH_DISTILL_REVERSE_KL, o.beta, 0.5f)
FD_SPARSE(remainder_jsd, RM, 1.0f, FH_DISTILL_JSD, o.beta, 0.3f)
FD_SPARSE(remainder_jsd_scaled, RM, 1.0f, FH_DISTILL_JSD_SCALED, o.beta, 0.7f)
FD_SPARSE(remainder_tvd, RM, 1.0f, FH_DISTILL_TVD, o.beta, 0.5f)
FD_SPARSE(remainder_skew_fkl, RM, 1.0f, FH_DISTILL_SKEW_FORWARD_KL, o.skew, 0.25f)
FD_SPARSE(remainder_skew_rkl, RM, 1.0f, FH_DISTILL_SKEW_REVERSE_KL, o.skew, 0.4f)
FD_SPARSE(remainder_alpha_minus_0_5, RM, 1.0f, FH_DISTILL_ALPHA, o.alpha, -0.5f)
FD_SPARSE(remainder_alpha_1_5, RM, 1.0f, FH_DISTILL_ALPHA, o.alpha, 1.5f)
FD_SPARSE(remainder_hellinger, RM, 1.0f, FH_DISTILL_HELLINGER, o.beta, 0.5f)
