/* emu_ptx_math.cpp: twins of the MUFU approximations ex2/rcp/lg2.approx.ftz.f32.
 *
 * The PTX ISA ("Floating Point Instructions": ex2, rcp, lg2) documents these instructions by an
 * error bound, not by their bits, so a kernel may rely on the bound and nothing else. The twins
 * return the exact result (computed in double) moved deterministically, by a hash of the input's
 * bits, to somewhere within the bound, so a kernel that silently needs more accuracy than is
 * documented fails here, while the same input always gives the same output (batch invariance
 * depends on it). Bounds, as kernels/engine/ptx.cuh states them from the ISA:
 *   ex2.approx.f32  maximum relative error 2^-22;
 *   rcp.approx.f32  maximum error 1 ulp (the twin rounds faithfully: one of the two floats
 *                   around the exact 1/x);
 *   lg2.approx.f32  maximum absolute error 2^-22 for x in [0.5, 2] (where log2 x is near 0 and a
 *                   relative bound would be meaningless), relative error 2^-22 elsewhere.
 * .ftz: subnormal inputs are read as zero of the same sign and subnormal results are flushed to
 * zero of the same sign. Special values follow the ISA's tables: ex2(-inf) = +0, ex2(+inf) =
 * +inf; rcp(+-0) = +-inf, rcp(+-inf) = +-0; lg2(+-0) = -inf, lg2(x < 0) = NaN, lg2(+inf) = +inf;
 * NaN gives (the canonical) NaN.
 * Where the exact result is a power of two (ex2 of an integer, rcp and lg2 of a power of two) the
 * twins return it exactly: MUFU's table-driven evaluation is exact at these points on the
 * hardware, and kernels may count on ex2(0) == 1 (the row maximum's own term) and lg2(1) == 0
 * without that being a hidden accuracy assumption. */
#include <cfloat>
#include <cmath>
#include <cstring>

#include "emu_internal.h"
#include "emu_ptx.h"

namespace fh_emu {

namespace {

uint32_t bits_of(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}
float float_of(uint32_t b) {
  float x;
  std::memcpy(&x, &b, 4);
  return x;
}
const float kNaN = float_of(0x7fffffffu); /* the hardware's canonical NaN */

/* A deterministic value in [-1, 1] from the input bits and the instruction. */
double unit_from(uint32_t x, uint64_t salt) {
  uint64_t z = (uint64_t)x * 0x9e3779b97f4a7c15ull + salt;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return (double)(z >> 11) * 0x1p-52 - 1.0;
}

float ftz(float x) { return std::fabs(x) < FLT_MIN ? std::copysign(0.0f, x) : x; }

void note_mufu() {
  if (in_kernel()) ++worker_counters().mufu_ops;
}

bool power_of_two(float x) { /* x > 0, normal */
  return (bits_of(x) & 0x7fffffu) == 0;
}

} // namespace

float ptx_ex2_approx(float x) {
  note_mufu();
  x = ftz(x);
  if (std::isnan(x)) return kNaN;
  if (std::isinf(x)) return x > 0 ? x : 0.0f;
  if (x == std::floor(x)) /* 2^n: exact, flushed below FLT_MIN, infinite from 128 on */
    return x >= 128.0f ? INFINITY : x < -126.0f ? 0.0f : std::ldexp(1.0f, (int)x);
  /* Relative perturbation up to 2^-23, plus at most 2^-24 from rounding to float: < 2^-22. */
  const double exact = std::exp2((double)x);
  const double y = exact * (1.0 + unit_from(bits_of(x), 0x1e2ull) * 0x1p-23);
  return ftz((float)y);
}

float ptx_rcp_approx(float x) {
  note_mufu();
  x = ftz(x);
  if (std::isnan(x)) return kNaN;
  if (x == 0.0f) return std::copysign(INFINITY, x);
  if (std::isinf(x)) return std::copysign(0.0f, x);
  const double exact = 1.0 / (double)x;
  const float nearest = (float)exact;
  if ((double)nearest == exact) return ftz(nearest); /* powers of two */
  /* Faithful rounding: the nearest float or its neighbour on the other side of the exact
   * value, both within 1 ulp. */
  const float other = std::nextafter(nearest, (double)nearest > exact ? -INFINITY : INFINITY);
  const float r = unit_from(bits_of(x), 0x2c3ull) < 0.0 ? nearest : other;
  return ftz(std::isinf(r) ? nearest : r);
}

float ptx_lg2_approx(float x) {
  note_mufu();
  x = ftz(x);
  if (std::isnan(x) || x < 0.0f) return kNaN;
  if (x == 0.0f) return -INFINITY;
  if (std::isinf(x)) return x;
  if (power_of_two(x)) return (float)std::ilogb(x);
  const double exact = std::log2((double)x);
  const double e = unit_from(bits_of(x), 0x3a4ull);
  double y;
  if (x >= 0.5f && x <= 2.0f) /* absolute 2^-22 - 2^-24, plus at most 2^-25 rounding (|y| < 1) */
    y = exact + e * (0x1p-22 - 0x1p-24);
  else /* relative 2^-23, plus at most 2^-24 rounding */
    y = exact * (1.0 + e * 0x1p-23);
  return (float)y; /* |log2 x| >= 2^-24 for every float x != 1: never subnormal */
}

namespace {
/* fp32 -> bf16, round to nearest even (PTX ISA cvt .rn); any NaN becomes the canonical 0x7fff. */
uint32_t bf16_rn(float x) {
  const uint32_t b = bits_of(x);
  if (std::isnan(x)) return 0x7fffu;
  return (b + 0x7fffu + ((b >> 16) & 1u)) >> 16; /* carries into the exponent: overflow to inf */
}
} // namespace

uint32_t ptx_cvt_bf16x2(float lo, float hi) { return bf16_rn(lo) | (bf16_rn(hi) << 16); }

} // namespace fh_emu
