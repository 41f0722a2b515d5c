/* Suite emu_ptx (MUFU): the ex2/rcp/lg2.approx.ftz.f32 twins stay within the bounds ptx.cuh
 * states, actually use them (they are not the exact functions), are deterministic, flush
 * subnormals and give the documented special values. Called from the host (they are pure), and
 * from a kernel once for the counter. */
#include <cfloat>
#include <cmath>

#include "emu_test.h"
#include "engine/ptx.cuh"

using fh_emu::ptx_ex2_approx;
using fh_emu::ptx_lg2_approx;
using fh_emu::ptx_rcp_approx;

static float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

/* Inputs: a deterministic spread of normal floats of both signs over [-lim, lim]. */
static std::vector<float> inputs(float lim, int n, uint64_t seed) {
  std::vector<float> v((size_t)n);
  for (float& x : v) {
    seed = seed * 6364136223846793005ull + 1442695040888963407ull;
    x = (float)(((double)(seed >> 11) * 0x1p-53 * 2.0 - 1.0) * lim);
  }
  return v;
}

Test(emu_ptx, ex2_within_bound) {
  int perturbed = 0;
  for (float x : inputs(125.0f, 200000, 1)) { /* results stay normal */
    const float y = ptx_ex2_approx(x);
    const double exact = std::exp2((double)x);
    cr_assert(std::fabs(y - exact) <= 0x1p-22 * exact, "ex2(%a) = %a, exact %a", x, y, exact);
    cr_assert_eq(y, ptx_ex2_approx(x), "deterministic");
    perturbed += y != (float)exact;
  }
  cr_expect_gt(perturbed, 100000, "the twin must not be exact (%d perturbed)", perturbed);
}

Test(emu_ptx, ex2_special_values) {
  cr_expect_eq(ptx_ex2_approx(0.0f), 1.0f);
  cr_expect_eq(ptx_ex2_approx(-0.0f), 1.0f);
  cr_expect_eq(ptx_ex2_approx(from_bits(0x00000005u)), 1.0f, "subnormal input reads as 0");
  cr_expect_eq(ptx_ex2_approx(3.0f), 8.0f, "integers: exact powers of two");
  cr_expect_eq(ptx_ex2_approx(-INFINITY), 0.0f);
  cr_expect_eq(ptx_ex2_approx(INFINITY), INFINITY);
  cr_expect_eq(ptx_ex2_approx(128.0f), INFINITY);
  cr_expect(std::isnan(ptx_ex2_approx(NAN)));
  cr_expect_eq(ptx_ex2_approx(-126.5f), 0.0f, "subnormal results flush to zero");
  cr_expect_eq(ptx_ex2_approx(-140.0f), 0.0f);
  cr_expect_eq(ptx_ex2_approx(-126.0f), FLT_MIN);
}

Test(emu_ptx, rcp_within_one_ulp) {
  int perturbed = 0;
  for (float x : inputs(1e30f, 200000, 2)) {
    if (std::fabs(x) < 1e-30f) continue;
    const float y = ptx_rcp_approx(x);
    const double exact = 1.0 / (double)x;
    const double ulp = std::ldexp(1.0, std::ilogb(exact) - 23);
    cr_assert(std::fabs(y - exact) < ulp, "rcp(%a) = %a, exact %a", x, y, exact);
    cr_assert_eq(y, ptx_rcp_approx(x));
    perturbed += y != (float)exact;
  }
  cr_expect_gt(perturbed, 50000, "%d perturbed", perturbed);
}

Test(emu_ptx, rcp_special_values) {
  cr_expect_eq(ptx_rcp_approx(0.0f), INFINITY);
  cr_expect_eq(ptx_rcp_approx(-0.0f), -INFINITY);
  cr_expect_eq(ptx_rcp_approx(from_bits(0x80000003u)), -INFINITY, "subnormal input reads as -0");
  cr_expect_eq(ptx_rcp_approx(INFINITY), 0.0f);
  cr_expect(std::signbit(ptx_rcp_approx(-INFINITY)));
  cr_expect_eq(ptx_rcp_approx(4.0f), 0.25f);
  cr_expect_eq(ptx_rcp_approx(3e38f), 0.0f, "1/3e38 is subnormal: flushed");
  cr_expect(std::isnan(ptx_rcp_approx(NAN)));
}

Test(emu_ptx, lg2_within_bound) {
  int perturbed = 0;
  std::vector<float> xs = inputs(1e30f, 100000, 3), near1 = inputs(0.75f, 100000, 4);
  for (float& x : near1) x = 1.25f + x; /* [0.5, 2] */
  xs.insert(xs.end(), near1.begin(), near1.end());
  for (float x : xs) {
    x = std::fabs(x);
    if (x < FLT_MIN) continue;
    const float y = ptx_lg2_approx(x);
    const double exact = std::log2((double)x);
    const double bound = x >= 0.5f && x <= 2.0f ? 0x1p-22 : 0x1p-22 * std::fabs(exact);
    cr_assert(std::fabs(y - exact) <= bound, "lg2(%a) = %a, exact %a", x, y, exact);
    cr_assert_eq(y, ptx_lg2_approx(x));
    perturbed += y != (float)exact;
  }
  cr_expect_gt(perturbed, 100000, "%d perturbed", perturbed);
}

Test(emu_ptx, lg2_special_values) {
  cr_expect_eq(ptx_lg2_approx(1.0f), 0.0f);
  cr_expect_eq(ptx_lg2_approx(0.125f), -3.0f);
  cr_expect_eq(ptx_lg2_approx(0.0f), -INFINITY);
  cr_expect_eq(ptx_lg2_approx(-0.0f), -INFINITY);
  cr_expect_eq(ptx_lg2_approx(from_bits(0x00000001u)), -INFINITY, "subnormal input reads as 0");
  cr_expect(std::isnan(ptx_lg2_approx(-1.0f)));
  cr_expect(std::isnan(ptx_lg2_approx(-INFINITY)));
  cr_expect_eq(ptx_lg2_approx(INFINITY), INFINITY);
  cr_expect(std::isnan(ptx_lg2_approx(NAN)));
}

__global__ void mufu_kernel(const float* x, float* y) {
  const int t = threadIdx.x;
  y[t] = fh_ptx::ex2(x[t]) + fh_ptx::rcp(x[t]) + fh_ptx::lg2(x[t]);
}

/* cvt.rn.bf16x2.f32: round to nearest even, lo in the low half, canonical NaN, overflow to inf;
 * and the engine's three-piece split of an fp32 value (f32x3 in sm80.cuh) is exact to 2^-24. */
Test(emu_ptx, cvt_bf16x2_and_the_three_piece_split) {
  using fh_emu::ptx_cvt_bf16x2;
  cr_expect_eq(ptx_cvt_bf16x2(1.0f, -2.0f), 0xc0003f80u, "lo in bits 0-15");
  cr_expect_eq(ptx_cvt_bf16x2(from_bits(0x3f808000u), from_bits(0x3f818000u)), 0x3f823f80u, "ties to even");
  cr_expect_eq(ptx_cvt_bf16x2(from_bits(0x3f808001u), 0.0f) & 0xffffu, 0x3f81u, "above the tie rounds up");
  cr_expect_eq(ptx_cvt_bf16x2(NAN, -NAN), 0x7fff7fffu, "canonical NaN");
  cr_expect_eq(ptx_cvt_bf16x2(FLT_MAX, -INFINITY), 0xff807f80u, "FLT_MAX rounds to inf");
  int inexact_two = 0;
  for (float x : inputs(1e6f, 100000, 3)) {
    double sum = 0.0;
    float r = x;
    for (int q = 0; q < 3; ++q) { /* the split's arithmetic: piece, then the exact remainder */
      const float piece = from_bits(ptx_cvt_bf16x2(r, 0.0f) << 16);
      if (q == 1) inexact_two += (double)piece + sum != (double)x;
      sum += piece;
      r -= piece;
    }
    cr_assert(std::fabs(sum - (double)x) <= 0x1p-24 * std::fabs((double)x), "split of %a: sum %a", x, sum);
  }
  cr_expect_gt(inexact_two, 50000, "two pieces alone must not be exact (%d)", inexact_two);
}

Test(emu_ptx, mufu_counted_and_same_in_kernels) {
  std::vector<float> h(32);
  for (int i = 0; i < 32; ++i) h[(size_t)i] = 0.37f + 0.71f * (float)i;
  float* y = dev_alloc<float>(32);
  FH_LAUNCH(mufu_kernel, 1, 32, 0, nullptr, dev_upload(h), y);
  EMU_CHECK_LAUNCH();
  cr_expect_eq(fh_emu_last_counters().mufu_ops, 96u);
  std::vector<float> o = dev_download(y, 32);
  for (int i = 0; i < 32; ++i) {
    const float x = h[(size_t)i];
    cr_expect_eq(o[(size_t)i], ptx_ex2_approx(x) + ptx_rcp_approx(x) + ptx_lg2_approx(x));
  }
}
